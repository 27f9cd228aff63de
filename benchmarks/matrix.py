"""Matrix files: fixed settings x axes (cartesian product) + explicit scenarios + a Trainer baseline.

    name: cpu_smoke
    settings:          # every scenario starts from these (keys and defaults: SETTINGS below)
      model: {build: tiny-bert}
      data: {synthetic: {train: 256, test: 64}}
      steps: 20
    axes:              # one scenario per combination; a mapping value sets several keys at once
      precision: [fp32, bf16]
      parallel: [{strategy: none, nproc: 1}, {strategy: ddp, nproc: 2}]
    scenarios:         # extra rows, each merged onto settings (not multiplied by the axes)
      - {runner: trainer, precision: bf16, group_by_length: true}
    exclude: [{strategy: ddp, precision: bf16}]
    baseline: trainer  # or a mapping of settings that differ from the blog recipe's

A bad matrix stops with one line naming the file and the key (MatrixError -> exit code 2).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import typing
from pathlib import Path
from typing import Any

import yaml

from benchmarks.build import BuildError, check_model_spec, check_synthetic_spec
from engine.config import DataConfig, Recipe


class MatrixError(ValueError):
    """A matrix that cannot be run; one line naming the file and the key."""


# key -> default; None where "not set" has a meaning of its own (see the comments)
SETTINGS: dict[str, Any] = {
    "name": None,  # the scenario's id in results (default: made from the settings that tell it apart)
    "runner": "engine",  # engine: launch/train.py; trainer: benchmarks/trainer_baseline.py
    "model": None,  # folder, hub name, package://..., or {build: SHAPE, tokenizer, config, seed}
    "data": None,  # {source: ...} or {synthetic: {train, test, words, seed}}, plus data.* recipe keys
    "max_length": 256,
    "strategy": "none",  # the engine's distributed.strategy choices (CHOICES below)
    "nproc": 1,  # processes (torchrun when strategy is not none, or nproc > 1)
    "method": "full",  # the engine's peft.method choices, with full for its none
    "precision": "fp32",  # train.precision's choices (auto: each record keeps what it resolved to)
    "batch_size": 16,  # GLOBAL examples per micro-step (all processes): split evenly over nproc
    "grad_accum": 1,
    "eval_batch_size": 64,  # per process
    "steps": None,  # optimizer steps; set exactly one of steps / epochs
    "epochs": None,  # trains to the end: accuracy, F1 and time to target are recorded
    "warmup_steps": 2,  # first steps left out of the timing (compile, allocator, caches)
    "repeats": 1,  # fresh-process runs of the scenario, interleaved with the other scenarios
    "lr": 2e-5,
    "eval_every": 0,  # steps between evals (the accuracy-vs-time curve); 0: epoch ends only
    "log_every": 1,  # the engine's log interval; timings are read at each logged step
    "compile": False,
    "group_by_length": None,  # None: the runner's default (engine: on; Trainer: off, as in the blog)
    "threads": None,  # torch threads per process (default: usable cores / nproc)
    "seed": 42,
    "target_accuracy": None,  # time to reach it is recorded when the scenario trains to the end
    "timeout_s": 3600,  # per run
    "recipe": {},  # extra engine overrides, e.g. {train.warmup_ratio: 0.1}
    "trainer_args": {},  # extra TrainingArguments for the trainer runner
}
TOP_KEYS = {"name", "description", "settings", "axes", "scenarios", "exclude", "baseline", "max_outside_load"}


def engine_choices(schema: type = Recipe, prefix: str = "") -> dict[str, tuple]:
    """Every recipe key whose type is a Literal and its values: {"train.precision": ("auto", ...), ...}."""
    out = {}
    for name, tp in typing.get_type_hints(schema).items():
        if dataclasses.is_dataclass(tp):
            out.update(engine_choices(tp, f"{prefix}{name}."))
        elif typing.get_origin(tp) is typing.Literal:
            out[prefix + name] = typing.get_args(tp)
    return out


# harness settings that are the engine's recipe keys, and the harness's name where the engine's differs
ENGINE_KEYS = {"strategy": "distributed.strategy", "method": "peft.method", "precision": "train.precision"}
HARNESS_NAMES = {"method": {"none": "full"}}  # "full fine-tuning" reads better in a scenario id


def harness_choices(schema: type = Recipe) -> dict[str, tuple]:
    """Each choice setting's values: the engine's own lists (in the harness's names), and the runner."""
    engine = engine_choices(schema)
    out = {"runner": ("engine", "trainer")}
    for key, dotted in ENGINE_KEYS.items():
        out[key] = tuple(HARNESS_NAMES.get(key, {}).get(v, v) for v in engine[dotted])
    return out


def engine_value(key: str, value):
    """A harness setting's value as the engine's recipe key takes it (method full -> peft.method none)."""
    back = {harness: engine for engine, harness in HARNESS_NAMES.get(key, {}).items()}
    return back.get(value, value)


ENGINE_CHOICES = engine_choices()
CHOICES = harness_choices()
# data.* keys go to the engine as they are; max_length is a setting of its own, cache_dir the harness's
DATA_KEYS = {f.name for f in dataclasses.fields(DataConfig)} - {"max_length", "cache_dir"} | {"synthetic"}
POSITIVE_INTS = ("max_length", "nproc", "batch_size", "grad_accum", "eval_batch_size", "repeats",
                 "log_every", "timeout_s")
# what makes two scenarios train the same examples for the same steps: each distinct workload gets
# its own baseline, so a ratio never compares different models, data or batch sizes. How a run is
# timed or evaluated (warmup_steps, repeats, eval_every, ...) is not the workload: the baseline takes
# those from the first scenario of its workload
WORKLOAD_KEYS = ("model", "data", "max_length", "batch_size", "grad_accum", "steps", "epochs", "lr", "seed")
MEASURE_KEYS = ("warmup_steps", "repeats", "eval_every", "eval_batch_size", "target_accuracy", "timeout_s")
BLOG_RECIPE = {"runner": "trainer", "strategy": "none", "nproc": 1, "method": "full", "precision": "fp32",
               "compile": False, "group_by_length": None, "threads": None, "recipe": {}, "trainer_args": {}}
DEFAULT_MAX_OUTSIDE_LOAD = 0.25  # cores' worth of other processes' CPU use that flags a run


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def load_matrix(path: str | Path, sets: list[str] = ()) -> dict:
    """Read, validate and expand a matrix file: {"name", "description", "scenarios": [...], ...}."""
    where = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise MatrixError(f"{where}: cannot read matrix ({e.__class__.__name__}: {_one_line(e)})") from None
    except yaml.YAMLError as e:
        raise MatrixError(f"{where}: not valid YAML ({_one_line(e)})") from None
    if not isinstance(raw, dict):
        raise MatrixError(f"{where}: a matrix must be a mapping with 'settings' and 'axes'")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise MatrixError(f"{where}: unknown top-level key '{sorted(unknown)[0]}'; "
                          f"known: {', '.join(sorted(TOP_KEYS))}")
    settings = _mapping(raw.get("settings") or {}, "settings", where)
    axes = _mapping(raw.get("axes") or {}, "axes", where)
    extra = raw.get("scenarios") or []
    exclude = raw.get("exclude") or []
    for key, value in (("scenarios", extra), ("exclude", exclude)):
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise MatrixError(f"{where}: '{key}' must be a list of mappings")
    overrides = parse_sets(sets)
    for key in overrides:  # a --set key pins that setting: its axis would only make duplicates
        axes.pop(key.split(".")[0], None)

    rows = []
    for axis, values in axes.items():
        if not isinstance(values, list) or not values:
            raise MatrixError(f"{where}: axis '{axis}' must be a non-empty list")
        if axis not in SETTINGS and not all(isinstance(v, dict) for v in values):
            raise MatrixError(f"{where}: axis '{axis}' is not a setting (known: {', '.join(SETTINGS)}); "
                              f"an axis of another name must list mappings of settings")
    names = list(axes)
    # no axes: the settings alone are one scenario, unless explicit scenarios say what to run
    combos = itertools.product(*(axes[a] for a in names)) if names else ([] if extra else [()])
    for combo in combos:
        row = copy.deepcopy(settings)
        for axis, value in zip(names, combo, strict=True):
            row = _merge(row, value if isinstance(value, dict) and axis not in SETTINGS else {axis: value})
        rows.append(row)
    rows += [_merge(copy.deepcopy(settings), s) for s in extra]
    rows = [r for r in rows if not any(all(r.get(k, SETTINGS.get(k)) == v for k, v in ex.items()) for ex in exclude)]
    scenarios = []
    for r in rows:  # a --set can make rows equal: run each once
        s = validate(_apply_sets(r, overrides), where)
        if s not in scenarios:
            scenarios.append(s)

    baseline = raw.get("baseline")
    if baseline is not None:
        if baseline == "trainer":
            baseline = {}
        if not isinstance(baseline, dict):
            raise MatrixError(f"{where}: 'baseline' must be 'trainer' or a mapping of settings")
        scenarios += baselines(scenarios, baseline, overrides, where)
    name_ids(scenarios, where)
    load_cap = raw.get("max_outside_load", DEFAULT_MAX_OUTSIDE_LOAD)
    if not isinstance(load_cap, (int, float)) or load_cap < 0:
        raise MatrixError(f"{where}: 'max_outside_load' must be a number of cores >= 0")
    return {"name": raw.get("name") or Path(path).stem, "description": raw.get("description", ""),
            "path": where, "scenarios": scenarios, "max_outside_load": float(load_cap), "sets": list(sets)}


def parse_sets(sets: list[str]) -> dict:
    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MatrixError(f"--set '{item}': expected key=value (e.g. repeats=1, data.train_size=64)")
        try:
            out[key.strip()] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def _apply_sets(row: dict, overrides: dict) -> dict:
    row = copy.deepcopy(row)
    for key, value in overrides.items():
        parts = key.split(".")
        node = row
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return row


def _mapping(value, key: str, where: str) -> dict:
    if not isinstance(value, dict):
        raise MatrixError(f"{where}: '{key}' must be a mapping")
    return copy.deepcopy(value)


def _merge(base: dict, over: dict) -> dict:
    """Settings `over` onto `base`; data, recipe and trainer_args merge key by key, the rest replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k in ("data", "recipe", "trainer_args") and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **copy.deepcopy(v)}
        else:
            out[k] = copy.deepcopy(v)
    return out


def validate(row: dict, where: str) -> dict:
    """Fill defaults and check every setting's type; the scenario as the harness uses it."""
    unknown = set(row) - set(SETTINGS)
    if unknown:
        key = sorted(unknown)[0]
        near = difflib.get_close_matches(key, SETTINGS, n=1)
        raise MatrixError(f"{where}: unknown setting '{key}'" + (f" (did you mean '{near[0]}'?)" if near else ""))
    s = {**copy.deepcopy(SETTINGS), **row}
    for key, choices in CHOICES.items():
        if s[key] not in choices:
            raise MatrixError(f"{where}: '{key}' must be one of {', '.join(choices)}; got {s[key]!r}")
    for key in POSITIVE_INTS:
        if not _is_int(s[key]) or s[key] < 1:
            raise MatrixError(f"{where}: '{key}' must be an integer >= 1; got {s[key]!r}")
    for key in ("warmup_steps", "eval_every", "seed"):
        if not _is_int(s[key]) or s[key] < 0:
            raise MatrixError(f"{where}: '{key}' must be an integer >= 0; got {s[key]!r}")
    if (s["steps"] is None) == (s["epochs"] is None):
        raise MatrixError(f"{where}: set exactly one of 'steps' and 'epochs' (got steps={s['steps']!r}, "
                          f"epochs={s['epochs']!r})")
    if s["steps"] is not None and (not _is_int(s["steps"]) or s["steps"] <= s["warmup_steps"]):
        raise MatrixError(f"{where}: 'steps' must be an integer > warmup_steps ({s['warmup_steps']}); "
                          f"got {s['steps']!r}")
    s["epochs"] = _number(s["epochs"], "epochs", where) if s["epochs"] is not None else None
    if s["epochs"] is not None and s["epochs"] <= 0:
        raise MatrixError(f"{where}: 'epochs' must be > 0")
    s["lr"] = _number(s["lr"], "lr", where)
    if s["lr"] <= 0:
        raise MatrixError(f"{where}: 'lr' must be > 0")
    if s["target_accuracy"] is not None:
        s["target_accuracy"] = _number(s["target_accuracy"], "target_accuracy", where)
        if not 0 < s["target_accuracy"] <= 1:
            raise MatrixError(f"{where}: 'target_accuracy' must be in (0, 1]")
    for key in ("compile",):
        if not isinstance(s[key], bool):
            raise MatrixError(f"{where}: '{key}' must be true or false; got {s[key]!r}")
    if s["group_by_length"] is not None and not isinstance(s["group_by_length"], bool):
        raise MatrixError(f"{where}: 'group_by_length' must be true, false or null")
    if s["threads"] is not None and (not _is_int(s["threads"]) or s["threads"] < 1):
        raise MatrixError(f"{where}: 'threads' must be an integer >= 1 or null")
    if s["name"] is not None and (not isinstance(s["name"], str) or not s["name"].strip()):
        raise MatrixError(f"{where}: 'name' must be a non-empty string")
    for key in ("recipe", "trainer_args"):
        if not isinstance(s[key], dict):
            raise MatrixError(f"{where}: '{key}' must be a mapping")
    _check_model(s["model"], where)
    _check_data(s["data"], where)
    _check_engine_choices({**{f"data.{k}": v for k, v in s["data"].items()}, **s["recipe"]}, where)
    return s


def _check_engine_choices(keys: dict, where: str) -> None:
    """Engine keys passed through (data.*, recipe) whose value is not one of the engine's choices."""
    for key, value in keys.items():
        choices = ENGINE_CHOICES.get(key)
        if choices is not None and value not in choices:
            raise MatrixError(f"{where}: '{key}' must be one of {', '.join(choices)}; got {value!r}")


def _check_model(model, where: str) -> None:
    if isinstance(model, str) and model.strip():
        return
    if isinstance(model, dict):
        try:
            check_model_spec(model, where)
        except BuildError as e:
            raise MatrixError(str(e)) from None
        return
    raise MatrixError(f"{where}: 'model' must be a path, hub name, package:// path or {{build: SHAPE}}; got {model!r}")


def _check_data(data, where: str) -> None:
    if not isinstance(data, dict):
        raise MatrixError(f"{where}: 'data' must be a mapping with 'source' or 'synthetic'; got {data!r}")
    unknown = set(data) - DATA_KEYS
    if unknown:
        raise MatrixError(f"{where}: unknown data key 'data.{sorted(unknown)[0]}'; "
                          f"known: {', '.join(sorted(DATA_KEYS))}")
    if ("source" in data) == ("synthetic" in data):
        raise MatrixError(f"{where}: 'data' needs exactly one of 'source' and 'synthetic'")
    if "synthetic" in data:
        if not isinstance(data["synthetic"], dict):
            raise MatrixError(f"{where}: 'data.synthetic' must be a mapping (train, test, words, seed)")
        try:
            check_synthetic_spec(data["synthetic"], where)
        except BuildError as e:
            raise MatrixError(str(e)) from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v, key: str, where: str) -> float:
    if isinstance(v, bool):
        raise MatrixError(f"{where}: '{key}' must be a number; got {v!r}")
    try:
        return float(v)  # YAML 1.1 reads 2e-5 as a string
    except (TypeError, ValueError):
        raise MatrixError(f"{where}: '{key}' must be a number; got {v!r}") from None


def workload(s: dict) -> str:
    return yaml.safe_dump({k: s[k] for k in WORKLOAD_KEYS}, sort_keys=True)


def baselines(scenarios: list[dict], over: dict, sets: dict, where: str) -> list[dict]:
    """The blog recipe on each distinct workload of the matrix, marked as the ratio's denominator."""
    out, seen = [], {}
    for s in scenarios:
        key = workload(s)
        if key in seen:
            s["baseline_of"] = seen[key]
            continue
        row = {**{k: s[k] for k in WORKLOAD_KEYS + MEASURE_KEYS}, **copy.deepcopy(BLOG_RECIPE)}
        b = validate(_apply_sets(_merge(row, over), sets), f"{where}: baseline")
        b["name"] = over.get("name")
        b["is_baseline"] = True
        seen[key] = len(out)
        s["baseline_of"] = len(out)
        out.append(b)
    return out


def model_label(model) -> str:
    if isinstance(model, dict):
        return model["build"]
    text = str(model).rstrip("/")
    if text.startswith("package://"):
        return text[len("package://"):].split("/")[0]
    parts = Path(text).parts
    return parts[-2] if len(parts) > 1 and parts[-1] in ("model", "tuned", "base") else parts[-1]


def name_ids(scenarios: list[dict], where: str) -> None:
    """Give each scenario a short id from the settings that tell it apart; clashing ids are an error."""
    varies = {k for k in SETTINGS if len({yaml.safe_dump(s[k], sort_keys=True) for s in scenarios}) > 1}
    base_index = [s for s in scenarios if s.get("is_baseline")]
    for s in scenarios:
        if s["name"]:
            s["id"] = s["name"]
            continue
        parts = ["baseline" if s.get("is_baseline") else s["runner"]]
        if "model" in varies:
            parts.append(model_label(s["model"]))
        if not s.get("is_baseline"):
            parts += [f"{s['strategy']}{s['nproc']}", s["method"], s["precision"]]
            if s["compile"]:
                parts.append("compile")
            if s["group_by_length"] is False and s["runner"] == "engine":
                parts.append("nogroup")
            if s["group_by_length"] and s["runner"] == "trainer":
                parts.append("group")
            if s["threads"]:
                parts.append(f"t{s['threads']}")
        for key, tag in (("batch_size", "bs"), ("max_length", "len"), ("steps", "steps"), ("epochs", "ep"),
                         ("grad_accum", "ga"), ("lr", "lr")):
            if key in varies:
                parts.append(f"{tag}{s[key]}")
        s["id"] = "-".join(str(p) for p in parts)
    for s in scenarios:  # index -> id, now that every baseline has one
        if "baseline_of" in s:
            s["baseline_id"] = base_index[s.pop("baseline_of")]["id"]
        elif not s.get("is_baseline"):
            s["baseline_id"] = None
    seen = {}
    for s in scenarios:
        if s["id"] in seen:
            raise MatrixError(f"{where}: two scenarios get the id '{s['id']}' (they differ only in settings "
                              f"the id leaves out, or repeat each other); give them a 'name'")
        seen[s["id"]] = s
