"""A classifier to score with, for launch/predict.py and launch/evaluate.py alike: a tuned/ or base/
snapshot, an adapter/ folder put on the base it was trained on, or a hub name; with the run
settings the folder carries (engine/run_settings.py).

An adapter goes on its own run's base/ (beside it) first, then the one its adapter_config.json
names; the base's weights digest, written with the adapter, must match, so an adapter is never put
on another model that merely has the same shapes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine import modeling, run_settings
from engine.checkpoint import WEIGHTS, file_sha256
from engine.config import ModelConfig
from engine.errors import MissingPackageError, ModelError
from engine.paths import exists, is_local, resolve
from engine.run_settings import RunSettings

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Loaded:
    model: object
    tokenizer: object
    settings: RunSettings | None  # None: a hub model, or a snapshot from before run_settings.json
    base: str | None = None  # adapter/ only: the base it was put on
    base_sha256: str | None = None  # ... and that base's weights digest, where it has one file

    @property
    def label_names(self) -> list[str]:
        return modeling.label_names_of(self.model)


def load(spec: str, base: str | None = None, trust_remote_code: bool = False) -> Loaded:
    """The classifier `spec` names; an adapter/ is merged into its base, so it scores as tuned/ does.
    `base`: the base for an adapter (it must be the one the adapter was trained on, where that is known)."""
    folder = _local(spec)
    settings = run_settings.read(folder) if folder is not None and folder.is_dir() else None
    attention = settings.attn_implementation if settings else "auto"
    if folder is None or not (folder / ADAPTER_CONFIG).is_file():
        if base:
            raise ModelError(f"--base {base}: {spec} is not an adapter/ folder (no {ADAPTER_CONFIG})")
        mcfg = ModelConfig(name_or_path=spec, trust_remote_code=trust_remote_code, attn_implementation=attention)
        tokenizer = modeling.load_tokenizer(mcfg)
        return Loaded(modeling.load_model(mcfg, tokenizer=tokenizer), tokenizer, settings)
    from peft import PeftModel

    where, sha = adapter_base(folder, base, settings.base_sha256 if settings else None)
    mcfg = ModelConfig(name_or_path=where, trust_remote_code=trust_remote_code, attn_implementation=attention)
    tokenizer = modeling.load_tokenizer(mcfg)
    model = modeling.load_model(mcfg, tokenizer=tokenizer)
    try:
        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"{folder}: cannot put the adapter on {where} "
                         f"({e.__class__.__name__}: {' '.join(str(e).split())[:200]})") from None
    return Loaded(model, tokenizer, settings, where, sha)


def adapter_base(folder: Path, asked: str | None, recorded: str | None) -> tuple[str, str | None]:
    """(the base to put the adapter in `folder` on, its weights sha256). Candidates: `asked` alone when
    given; else the run's own base/ beside adapter/, then the base adapter_config.json names (the
    engine names it relative to where training ran, so it may mean another folder from here).
    With a `recorded` digest (written by the run) the first candidate whose weights match is taken,
    and none matching is refused; without one (an older or foreign adapter), the first that exists."""
    named = _named_base(folder)
    candidates = [asked] if asked else list(dict.fromkeys(c for c in (str(folder.parent / "base"), named) if c))
    tried, mismatched = [], False
    for candidate in candidates:
        if not _exists(candidate):
            tried.append(f"{candidate} (not found)")
            continue
        sha = weights_sha256(candidate)
        if recorded is None or sha == recorded:
            return candidate, sha
        mismatched = True
        tried.append(f"{candidate} (weights sha256 {sha[:12] + '...' if sha else 'unknown: no ' + WEIGHTS})")
    if mismatched:
        raise ModelError(f"{folder}: the adapter was trained on a base whose weights have sha256 {recorded[:12]}...; "
                         f"refused on {'; '.join(tried)}; pass --base with its run's base/")
    hub = next((c for c in candidates if not is_local(c)), None)
    if recorded is None and hub:  # a foreign adapter may name its base by hub name
        return hub, None
    raise ModelError(f"{folder}: cannot load the adapter's base: {'; '.join(tried) or 'none named'}; pass --base")


def weights_sha256(spec: str) -> str | None:
    """The digest of a local snapshot's one weights file (as metrics.json records base/'s); None for
    a hub name or sharded weights."""
    folder = _local(spec)
    file = folder / WEIGHTS if folder is not None else None
    return file_sha256(file) if file is not None and file.is_file() else None


def _named_base(folder: Path) -> str | None:
    try:
        return json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelError(f"{folder / ADAPTER_CONFIG}: cannot read ({e.__class__.__name__}: {e})") from None


def _local(spec: str) -> Path | None:
    """The folder `spec` names on disk (package:// resolved), None for a hub name."""
    try:
        where = resolve(spec)
    except MissingPackageError as e:
        raise ModelError(str(e)) from None
    path = Path(where).expanduser()
    return path if exists(path) else None


def _exists(spec: str) -> bool:
    try:
        return _local(spec) is not None
    except ModelError:
        return False
