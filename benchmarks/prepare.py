"""Preparing a scenario: its model and data folders, the command and environment that run it, and
whether it can run on this machine at all (a reason, never a silent substitute)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import typing
from pathlib import Path

import yaml

from benchmarks import measure
from benchmarks.build import build_data, build_model
from benchmarks.matrix import ENGINE_CHOICES, engine_value
from engine.config import Recipe
from engine.errors import MissingPackageError
from engine.paths import is_local, resolve

BASE_RECIPE = "# benchmarks/run.py: every setting of the scenario is a key=value override\n"


class NotRunnable(Exception):
    """A scenario this machine or this engine cannot run; the message says why."""


def engine_supports_peft() -> bool:
    return importlib.util.find_spec("engine.adapters") is not None and "lora" in ENGINE_CHOICES["peft.method"]


def engine_has_key(section: str, key: str) -> bool:
    hints = typing.get_type_hints(Recipe)
    return section in hints and key in {f.name for f in dataclasses.fields(hints[section])}


def yaml_value(v) -> str:
    """A value as the engine's key=value parser (YAML) reads it back unchanged."""
    if isinstance(v, str):
        try:
            return v if yaml.safe_load(v) == v else json.dumps(v)
        except yaml.YAMLError:
            return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (dict, list)):
        return json.dumps(v)  # JSON is YAML flow style
    return repr(v)


def dry_precision(s: dict) -> str:
    """The scenario's precision; for auto, what it resolves to on this machine (the cached probe)."""
    if s["precision"] != "auto":
        return s["precision"]
    # torch takes seconds to import and only --dry-run of an auto scenario needs it here
    import torch

    from engine.precision import choose

    threads = torch.get_num_threads()
    torch.set_num_threads(s["threads"] or max(1, len(measure.usable_cpus()) // s["nproc"]))
    try:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return f"auto (here: {choose('auto', device, say=lambda text: None).name})"
    finally:
        torch.set_num_threads(threads)


def invalid_settings(s: dict) -> str | None:
    """What a scenario's command would be refused for, found without running it: engine overrides the
    recipe loader rejects, or trainer_args that TrainingArguments does not take. None when all is valid."""
    from engine.errors import RecipeError
    from engine.recipe_yaml import load_recipe

    prep = Preparer(Path("work"), gpus=0)
    overrides = prep.engine_overrides(s, "model", "data", Path("out"))
    if s["runner"] == "engine":
        try:
            load_recipe(None, overrides)
        except RecipeError as e:
            return f"engine overrides: {' '.join(str(e).split())[:200]}"
        return None
    try:  # the Trainer runner reads the data.* and peft.* overrides with the same loader
        load_recipe(None, [o for o in overrides if o.startswith(("data.", "seed=", "peft."))])
    except RecipeError as e:
        return f"data/peft overrides: {' '.join(str(e).split())[:200]}"
    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    unknown = sorted(set(s.get("trainer_args") or {}) - known)
    return f"trainer_args {unknown}: not TrainingArguments fields in this transformers" if unknown else None


class Preparer:
    def __init__(self, work: Path, gpus: int):
        self.work = work
        self.gpus = gpus
        self.models, self.shapes = {}, {}
        self.peft = engine_supports_peft()
        self.quiet_checkpoints = engine_has_key("checkpoint", "keep")

    def model_path(self, model) -> str:
        key = json.dumps(model, sort_keys=True)
        if key not in self.models:
            if isinstance(model, dict):
                self.models[key] = build_model(model, self.work / "models")
            else:
                try:
                    path = resolve(model)
                except MissingPackageError as e:
                    raise NotRunnable(str(e).split(" (")[0]) from None
                if is_local(model) and not Path(path).exists():
                    raise NotRunnable(f"model {model} not found")
                self.models[key] = path
        return self.models[key]

    def shape(self, path: str):
        if path not in self.shapes:
            try:
                self.shapes[path] = measure.model_shape(path)
            except Exception as e:  # noqa: BLE001 - a hub model offline: no FLOPs, the rest still counts
                self.shapes[path] = None
                print(f"note: no FLOP count for {path} ({e.__class__.__name__})", file=sys.stderr)
        return self.shapes[path]

    def data_source(self, data: dict) -> str:
        if "synthetic" in data:
            return build_data(data["synthetic"], self.work / "data")
        try:
            path = resolve(data["source"])
        except MissingPackageError as e:
            raise NotRunnable(str(e).split(" (")[0]) from None
        if is_local(data["source"]) and not Path(path).exists():
            raise NotRunnable(f"data {data['source']} not found")
        return data["source"]

    def why_not(self, s: dict) -> str | None:
        """A reason this scenario cannot run here, or None. Never a silent substitute."""
        if s["strategy"] == "none" and s["nproc"] > 1:
            return f"strategy none runs one process; nproc {s['nproc']} needs ddp or fsdp"
        if s["batch_size"] % s["nproc"]:
            return f"batch_size {s['batch_size']} (global) does not split evenly over {s['nproc']} processes"
        if self.gpus and s["nproc"] > self.gpus:
            return f"needs {s['nproc']} GPUs, {self.gpus} here"
        if s["runner"] == "trainer":
            if s["method"] not in ("full", "lora"):
                return "the Trainer baseline (the blog's recipe) runs full fine-tuning, or LoRA through peft"
            if s["strategy"] == "fsdp":
                return "the Trainer baseline runs DDP (torchrun) only"
        elif s["method"] != "full" and not self.peft:
            return f"method {s['method']}: the engine has no PEFT support yet (engine/adapters.py)"
        return None

    def engine_overrides(self, s: dict, model: str, source: str, out: Path) -> list[str]:
        d = s["data"]
        o = {"model.name_or_path": model, "data.source": source, "data.max_length": s["max_length"],
             "data.cache_dir": str(self.work / "token-cache"), "output_dir": str(out), "seed": s["seed"]}
        for key, value in d.items():
            if key not in ("source", "synthetic"):
                o[f"data.{key}"] = value
        o.update({"train.batch_size": s["batch_size"] // s["nproc"], "train.grad_accum": s["grad_accum"],
                  "train.eval_batch_size": s["eval_batch_size"], "train.lr": s["lr"],
                  "train.precision": engine_value("precision", s["precision"]), "train.log_every": s["log_every"],
                  "train.eval_every": s["eval_every"], "train.compile": s["compile"],
                  "distributed.strategy": engine_value("strategy", s["strategy"]),
                  "peft.method": engine_value("method", s["method"])})
        if s["steps"]:
            o["train.max_steps"] = s["steps"]
        else:
            o.update({"train.epochs": s["epochs"], "train.max_steps": 0})
        if s["group_by_length"] is not None:
            o["train.group_by_length"] = s["group_by_length"]
        if s["threads"]:
            o["train.num_threads"] = s["threads"]
        if self.quiet_checkpoints:  # resumable checkpoints are not what is measured: skip their writes
            o["checkpoint.keep"] = 0
        o.update(s["recipe"])
        return [f"{k}={yaml_value(v)}" for k, v in o.items()]

    def command(self, s: dict, run_dir: Path) -> list[str]:
        model = self.model_path(s["model"])
        source = self.data_source(s["data"])
        launcher = [sys.executable]
        if s["nproc"] > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={s['nproc']}"]
        if s["runner"] == "engine":
            recipe = self.work / "base_recipe.yaml"
            recipe.write_text(BASE_RECIPE)
            return launcher + ["launch/train.py", "--recipe", str(recipe), "--overwrite",
                               *self.engine_overrides(s, model, source, run_dir)]
        overrides = self.engine_overrides(s, model, source, run_dir)
        data_over = [o for o in overrides if o.startswith(("data.", "seed="))]
        settings = {k: s[k] for k in ("max_length", "batch_size", "nproc", "grad_accum", "lr", "steps", "epochs",
                                      "precision", "group_by_length", "compile", "eval_every", "seed",
                                      "trainer_args", "method")}
        # LoRA: the engine's adapter settings, so both put the same adapters on the same layers
        settings.update(model=model, data_overrides=data_over,
                        peft_overrides=[o for o in overrides if o.startswith("peft.")])
        (run_dir / "settings.json").write_text(json.dumps(settings, indent=1))
        return launcher + ["benchmarks/trainer_baseline.py", "--settings", str(run_dir / "settings.json"),
                           "--out", str(run_dir)]

    def env(self, s: dict) -> dict:
        cores = len(measure.usable_cpus())
        threads = s["threads"] or max(1, cores // s["nproc"])
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
               "PYTHONUNBUFFERED": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
               "TORCHINDUCTOR_CACHE_DIR": str(self.work / "inductor-cache")}
        if cores <= 2:  # compile workers would fight the training threads for the only cores
            env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
        return env
