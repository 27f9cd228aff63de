"""How a snapshot reads text, and which rows its run scored: `run_settings.json`.

A run writes this file into `tuned/`, `base/` and `adapter/` beside the weights (transformers and PEFT
ignore it): the cut (max_length, truncation, head_tokens), the class names, the precision and eval
batch size the snapshots were scored in, and what picked the run's rows (data source, splits, sizes,
seed). launch/predict.py and launch/evaluate.py read it back, so a run's figure is reproduced from
its snapshot without repeating the recipe by hand; a flag overrides one setting, and says so.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from engine.config import DataConfig, Recipe
from engine.errors import DataError, MissingPackageError, ModelError
from engine.paths import PACKAGE_SCHEME, is_local, resolve

FILE = "run_settings.json"
FORMAT = 1
# the settings that cut and score texts, each with its flag and the recipe key a run took it from
READING = {"max_length": ("--max-length", "data.max_length"), "truncation": ("--truncation", "data.truncation"),
           "head_tokens": ("--head-tokens", "data.head_tokens"),
           "batch_size": ("--batch-size", "train.eval_batch_size"), "precision": ("--precision", "train.precision")}
# what predict and evaluate use where neither a run nor a flag says (precision: the caller's default)
DEFAULTS = {"max_length": 512, "truncation": "head", "head_tokens": 128, "batch_size": 64}
# data keys that say how texts are cut (kept under "input"), or where this machine caches: not row selection
NOT_ROWS = ("max_length", "truncation", "head_tokens", "label_names", "cache_dir")


@dataclass(frozen=True)
class RunSettings:
    folder: Path  # the snapshot they were read from
    max_length: int
    truncation: str
    head_tokens: int
    label_names: list[str]
    precision: str  # what the run scored its snapshots in (auto already resolved)
    batch_size: int  # train.eval_batch_size: the batches, hence the padding, the run scored with
    attn_implementation: str | None
    data: DataConfig  # the run's data section: source made absolute, label_names the run's classes
    seed: int
    scored: str  # "test" (data.test_split) or "eval": the rows of metrics.json's base and tuned figures
    base_sha256: str | None = None  # adapter/ only: the weights of the base/ it was trained on

    @property
    def file(self) -> Path:
        return self.folder / FILE


@dataclass(frozen=True)
class Reading:
    """How texts are cut and scored this time."""
    max_length: int
    truncation: str
    head_tokens: int
    batch_size: int
    precision: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Writing (rank 0, into a snapshot folder before it is renamed into place)


def settings_of(recipe: Recipe, label_names: list[str], base_sha256: str | None = None) -> dict:
    """The file's content for a run's snapshot; `recipe` as it ran (train.precision resolved)."""
    d = recipe.data
    rows = {k: v for k, v in dataclasses.asdict(d).items() if k not in NOT_ROWS}
    rows["source"] = absolute_source(d.source)  # predict and evaluate run from any folder
    out = {"format": FORMAT,
           "input": {"max_length": d.max_length, "truncation": d.truncation, "head_tokens": d.head_tokens,
                     "label_names": list(label_names)},
           "scoring": {"precision": recipe.train.precision, "batch_size": recipe.train.eval_batch_size,
                       "attn_implementation": recipe.model.attn_implementation},
           "rows": {"seed": recipe.seed, "scored": "test" if d.test_split else "eval", "data": rows}}
    if base_sha256:
        out["base_sha256"] = base_sha256
    return out


def write(folder: str | Path, settings: dict) -> None:
    """Into a folder that is not yet in place (its commit fsyncs and renames it)."""
    (Path(folder) / FILE).write_text(json.dumps(settings, indent=2), encoding="utf-8")


def absolute_source(source: str) -> str:
    """A local data source as an absolute path; a package:// path or a hub name as it is."""
    if source.startswith(PACKAGE_SCHEME) or not is_local(source):
        return source
    return str(Path(resolve(source)).resolve())


# --------------------------------------------------------------------------------------------
# Reading


def read(folder: str | Path) -> RunSettings | None:
    """The settings a snapshot folder carries; None where it has none (a hub model, an older run)."""
    folder = Path(folder)
    file = folder / FILE
    if not file.is_file():
        return None
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
        if raw.get("format", 0) > FORMAT:
            raise ModelError(f"{file}: written by a newer engine (format {raw['format']}); update this one")
        inp, scoring, rows = raw["input"], raw["scoring"], raw["rows"]
        known = {f.name for f in dataclasses.fields(DataConfig)}
        cut = {k: inp[k] for k in ("max_length", "truncation", "head_tokens")}
        data = DataConfig(**{k: v for k, v in rows["data"].items() if k in known and k not in NOT_ROWS},
                          label_names=list(inp["label_names"]), **cut)
        return RunSettings(folder, **cut, label_names=list(inp["label_names"]), precision=scoring["precision"],
                           batch_size=int(scoring["batch_size"]),
                           attn_implementation=scoring.get("attn_implementation"), data=data,
                           seed=int(rows["seed"]), scored=rows["scored"], base_sha256=raw.get("base_sha256"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"{file}: unreadable ({e.__class__.__name__}: {' '.join(str(e).split())[:160]}); "
                         f"remove it to read texts with the flags' defaults") from None


def say(note: str) -> None:
    """Notes go to stderr: stdout stays the command's JSON summary, for scripts to read."""
    print(note, file=sys.stderr, flush=True)


def reading(settings: RunSettings | None, asked: dict, default_precision: str,
            positions: int | None = None) -> tuple[Reading, list[str]]:
    """Each READING setting: the flag where one was given (`asked`, None: not given), else the run's,
    else DEFAULTS (max_length no more than the model's `positions`); and a note for each flag that
    changes what the run did."""
    values, notes = {}, []
    defaults = {**DEFAULTS, "precision": default_precision}
    if positions is not None:  # a hub model with a shorter position table is read to its end, not refused
        defaults["max_length"] = min(defaults["max_length"], positions)
    for key, (flag, recipe_key) in READING.items():
        ran = getattr(settings, key) if settings else None
        given = asked.get(key)
        values[key] = given if given is not None else ran if settings else defaults[key]
        if settings and given is not None and given != ran:
            notes.append(f"note: {flag} {given} overrides the run's {recipe_key}={ran} ({settings.file})")
    out = Reading(**values)
    if out.truncation == "head_tail" and out.head_tokens >= out.max_length:
        raise DataError(f"--head-tokens ({out.head_tokens}) must be below --max-length ({out.max_length}) "
                        f"to leave room for the tail")
    return out, notes


# --------------------------------------------------------------------------------------------
# Rows


@dataclass(frozen=True)
class RowsAsked:
    """What evaluate's command line says about the rows; None: as the run did (or the default)."""
    source: str | None = None
    split: str | None = None
    size: int | None = None
    text_column: str | None = None
    label_column: str | None = None
    encoding: str | None = None
    label_names: list[str] | None = None


def select_rows(settings: RunSettings | None, asked: RowsAsked, model_names: list[str]):
    """(examples, which rows they are, notes). On the run's own source, the run's rows are picked by
    engine/sources' own selection (`load_splits`: the same seeds, sizes and hold-out), so `--split`
    of the run's eval or test split with `--size N` takes the subset a run with that size took;
    any other split, or another source, is read whole (or a seeded subset of `--size`)."""
    from engine import sources  # pandas and pyarrow: only when rows are read

    notes = []
    columns = {k: v for k in ("text_column", "label_column", "encoding")
               if (v := getattr(asked, k)) is not None}
    names = asked.label_names or model_names
    if settings is None or (asked.source is not None and absolute_source(asked.source) != settings.data.source):
        if asked.source is None:
            raise DataError("--data is needed: the model carries no run settings naming its data")
        if settings is not None:
            notes.append(f"note: --data {asked.source} is not the run's data.source ({settings.data.source}): "
                         f"its rows are read as given, not as the run selected them")
        cfg = DataConfig(source=asked.source, label_names=names, **columns)
        return (*_other_split(cfg, asked, settings.seed if settings else 42, sources), notes)
    for key, value in columns.items():
        if value != getattr(settings.data, key):
            notes.append(f"note: --{key.replace('_', '-')} {value} overrides the run's data.{key}="
                         f"{getattr(settings.data, key)} ({settings.file})")
    cfg = dataclasses.replace(settings.data, label_names=names, **columns)
    which = settings.scored if asked.split is None else (
        "test" if asked.split == cfg.test_split else "eval" if cfg.eval_split and asked.split == cfg.eval_split
        else None)
    if which is None:
        return (*_other_split(cfg, asked, settings.seed, sources), notes)
    size_key = "test_size" if which == "test" else "eval_size"
    if asked.size is not None and asked.size != getattr(cfg, size_key):
        notes.append(f"note: --size {asked.size} overrides the run's data.{size_key}={getattr(cfg, size_key)}")
    cfg = dataclasses.replace(cfg, **{size_key: asked.size or getattr(cfg, size_key)})
    if which == "eval":
        cfg = dataclasses.replace(cfg, test_split=None)
    splits = sources.load_splits(cfg, settings.seed)
    examples = splits.test if which == "test" else splits.eval
    split = cfg.test_split if which == "test" else cfg.eval_split or f"held out of {cfg.train_split}"
    return examples, f"{split} (the run's {which} rows)", notes


def _other_split(cfg: DataConfig, asked: RowsAsked, seed: int, sources):
    """A split read whole, or a seeded subset of --size; a single file is one split (its train)."""
    split = asked.split
    try:
        path = Path(resolve(cfg.source)).expanduser() if is_local(cfg.source) else None
    except MissingPackageError as e:
        raise DataError(str(e)) from None
    if path is not None and path.is_file():
        if split not in (None, cfg.train_split):
            raise DataError(f"{path}: a single file is one split; leave out --split to score all its rows "
                            f"(--size N: a seeded subset of them)")
        split = cfg.train_split
    split = split or "test"
    examples = sources.load_eval_split(dataclasses.replace(cfg, eval_size=asked.size), split, cfg.label_names,
                                       seed=seed)
    return examples, split
