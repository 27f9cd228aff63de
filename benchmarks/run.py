"""Run a benchmark matrix: every scenario in fresh processes, through launch/train.py as a user runs it.

    python benchmarks/run.py --matrix benchmarks/matrices/cpu_smoke.yaml --out benchmarks/results/NAME
        [--set repeats=1 ...] [--only REGEX] [--work DIR] [--dry-run] [--keep-runs] [--overwrite]

Each scenario runs `python launch/train.py --recipe <empty> key=value...` (under torchrun when
nproc > 1), or benchmarks/trainer_baseline.py for the Hugging Face Trainer. Repeats are
interleaved (all scenarios once, then all again) so a slow spell of the machine does not land on
one scenario. Timings come from the engine's own log.jsonl (one line per step with the default
log_every 1): the samples/s it logs are cumulative over its training clock, which gives the
clock's reading at every step; warm-up steps are cut off from that. Writes OUT/results.json,
OUT/results.md and PNG plots (benchmarks/report.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import measure  # noqa: E402
from benchmarks.build import BuildError  # noqa: E402
from benchmarks.matrix import MatrixError, load_matrix  # noqa: E402

SAMPLE_EVERY_S = 0.25  # memory sampling of the running tree: fine enough for allocations that last
BASE_RECIPE = "# benchmarks/run.py: every setting of the scenario is a key=value override\n"


class Fatal(ValueError):
    """Bad input to the harness itself (output folder, work folder); one line, exit 2."""


# --------------------------------------------------------------------------------------------
# Preparing a scenario: its model and data folders, the command, and whether it can run here


def engine_supports_peft() -> bool:
    import importlib.util
    import typing

    from engine.config import PeftConfig

    methods = typing.get_args(typing.get_type_hints(PeftConfig)["method"])
    return importlib.util.find_spec("engine.adapters") is not None and "lora" in methods


def engine_has_key(section: str, key: str) -> bool:
    import dataclasses
    import typing

    from engine.config import Recipe

    hints = typing.get_type_hints(Recipe)
    return section in hints and key in {f.name for f in dataclasses.fields(hints[section])}


def yaml_value(v) -> str:
    """A value as the engine's key=value parser (YAML) reads it back unchanged."""
    import yaml

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


class Preparer:
    def __init__(self, work: Path, gpus: int):
        self.work = work
        self.gpus = gpus
        self.models, self.shapes = {}, {}
        self.peft = engine_supports_peft()
        self.quiet_checkpoints = engine_has_key("checkpoint", "keep")

    def model_path(self, model) -> str:
        from benchmarks.build import build_model
        from engine.errors import MissingPackageError
        from engine.paths import is_local, resolve

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
        from benchmarks.build import build_data
        from engine.errors import MissingPackageError
        from engine.paths import is_local, resolve

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
            if s["method"] != "full":
                return "the Trainer baseline (the blog's recipe) is full fine-tuning only"
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
                  "train.precision": s["precision"], "train.log_every": s["log_every"],
                  "train.eval_every": s["eval_every"], "train.compile": s["compile"],
                  "distributed.strategy": s["strategy"],
                  "peft.method": "none" if s["method"] == "full" else s["method"]})
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
        data_over = [o for o in self.engine_overrides(s, model, source, run_dir)
                     if o.startswith(("data.", "seed="))]
        settings = {k: s[k] for k in ("max_length", "batch_size", "nproc", "grad_accum", "lr", "steps", "epochs",
                                      "precision", "group_by_length", "compile", "eval_every", "seed",
                                      "trainer_args")}
        settings.update(model=model, data_overrides=data_over)
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


class NotRunnable(Exception):
    pass


# --------------------------------------------------------------------------------------------
# Running one process tree, with its memory, CPU time and the machine's load beside it


def execute(cmd: list[str], env: dict, run_dir: Path, timeout_s: float) -> dict:
    before, self_before, started = measure.read_cpu_times(), measure.self_cpu_s(), time.perf_counter()
    peak_tree, timed_out = 0, False
    with open(run_dir / "stdout.txt", "w") as so, open(run_dir / "stderr.txt", "w") as se:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=so, stderr=se, start_new_session=True)
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                peak_tree = max(peak_tree, measure.tree_rss_bytes(proc.pid))
                if not timed_out and time.perf_counter() - started > timeout_s:
                    timed_out = True
                    _kill_group(proc.pid)
                time.sleep(SAMPLE_EVERY_S)
        except BaseException:
            _kill_group(proc.pid)  # ctrl-C or a harness bug: never leave a training tree behind
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    wall = time.perf_counter() - started
    own = usage.ru_utime + usage.ru_stime + (measure.self_cpu_s() - self_before)
    after = measure.read_cpu_times()
    load = measure.outside_load(before, after, own, wall) if before and after else None
    return {"returncode": proc.returncode, "timed_out": timed_out, "wall_s": round(wall, 2),
            "tree_peak_rss_bytes": peak_tree, "max_process_rss_bytes": usage.ru_maxrss * 1024,
            "own_cpu_s": round(own, 2), "load": load}


def _kill_group(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                os.killpg(pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.2)


def failure_reason(run_dir: Path, result: dict) -> str:
    if result["timed_out"]:
        return "timed out"
    lines = [l.strip() for l in (run_dir / "stderr.txt").read_text(errors="replace").splitlines() if l.strip()]
    # the engine's CLIs end with one line that says why; skip torchrun's and libraries' chatter after it
    for line in reversed(lines):
        if re.match(r"^(error|stopped|failed|rank \d+: failed|\w*Error)\b", line):
            return line[:300]
    return (lines[-1][:300] if lines else f"exit code {result['returncode']}")


# --------------------------------------------------------------------------------------------
# Reading what a run wrote


def engine_timeline(run_dir: Path, s: dict, metrics: dict) -> list[list[float]]:
    """[step, clock seconds, samples, real tokens, padded tokens], cumulative, from log.jsonl.

    The engine logs samples/s and tokens/s cumulative over its training clock (evaluation paused):
    at step k the job has trained k x global batch examples, so the clock read k x batch / rate.
    """
    per_step = s["batch_size"] * s["grad_accum"]  # global: every process's share
    rows = [[0, 0.0, 0.0, 0.0, 0.0]]
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rate = rec.get("train/samples_per_s")
        if not rate:
            continue
        step = rec["step"]
        samples = step * per_step
        t = samples / rate
        real = rec["train/tokens_per_s"] * t
        share = rec.get("train/padding_share", 0.0)
        rows.append([step, t, samples, real, real / (1 - share) if share < 1 else real])
    train_seconds = (metrics.get("train") or {}).get("train_seconds")
    if train_seconds and len(rows) > 1:
        # guards the reading above: if the engine ever logs windowed instead of cumulative rates,
        # the recovered clock stops matching its own total, and the run fails instead of lying
        clock = [r[1] for r in rows]
        if any(b < a for a, b in zip(clock, clock[1:])) or abs(clock[-1] - train_seconds) > max(1.0, 0.05 * train_seconds):
            raise ValueError(f"log.jsonl rates do not give the engine's training clock (last {clock[-1]:.2f} s, "
                             f"metrics.json train_seconds {train_seconds:.2f} s); benchmarks/run.py needs updating")
    world = s["nproc"]
    if world > 1 and len(rows) > 1:
        # the log counts rank 0's tokens x world; the final summary sums every rank's: rescale by it
        train = metrics["train"]
        last = rows[-1]
        f_real = train["real_tokens_per_s"] / (last[3] / last[1]) if last[3] else 1.0
        f_pad = train["padded_tokens_per_s"] / (last[4] / last[1]) if last[4] else 1.0
        rows = [[r[0], r[1], r[2], r[3] * f_real, r[4] * f_pad] for r in rows]
    return rows


def timed(timeline: list, warmup: int) -> dict:
    """Rates over the steps after warm-up: from the first logged step >= warmup to the last."""
    origin = next((i for i, r in enumerate(timeline) if r[0] >= warmup), None)
    if origin is None or origin == len(timeline) - 1:
        raise ValueError(f"no timed steps after the {warmup} warm-up steps "
                         f"(last logged step {timeline[-1][0]})")
    a, b = timeline[origin], timeline[-1]
    secs = b[1] - a[1]
    if secs <= 0:
        raise ValueError("the timed steps took no measurable time")
    steps = []
    for prev, cur in zip(timeline[origin:], timeline[origin + 1:]):
        steps.append((cur[1] - prev[1]) / (cur[0] - prev[0]))  # a window of log_every steps: per step
    samples, real, padded = b[2] - a[2], b[3] - a[3], b[4] - a[4]
    return {"timed_steps": b[0] - a[0], "timed_seconds": secs, "samples_per_s": samples / secs,
            "real_tokens_per_s": real / secs, "padded_tokens_per_s": padded / secs, "step_times": steps,
            "mean_real_len": real / samples if samples else 0.0,
            "padding_share": 1 - real / padded if padded else 0.0}


def clock_at(timeline: list, step: float) -> float:
    import numpy as np

    return float(np.interp(step, [r[0] for r in timeline], [r[1] for r in timeline]))


def read_engine(run_dir: Path, s: dict) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    line = engine_timeline(run_dir, s, metrics)
    out = timed(line, s["warmup_steps"])
    # One model for the accuracy and the curve it is timed on: the evals during training score the
    # model as it trained (QLoRA: the 4-bit copy; FSDP mixed precision: low-precision weight copies),
    # so the accuracies reported are that model's too; the saved snapshots' are kept beside them.
    # With data.test_split the curve is the dev evals and the accuracy the snapshots' on test.
    as_trained = (metrics.get("peft") or {}).get("quantized") or metrics.get("as_trained")
    if "dev" in metrics:
        scored, curve_from = metrics, metrics["dev"]
        accuracy_of = "the saved snapshots on the test split (curve and time to target: the dev evals)"
    else:
        scored = curve_from = as_trained or metrics
        accuracy_of = "the model as it trained" if as_trained else "the saved snapshots"
    curve = [{"step": 0, "t": 0.0, "accuracy": curve_from["base"]["accuracy"]}]
    curve += [{"step": e["step"], "t": round(clock_at(line, e["step"]), 3), "accuracy": e["accuracy"]}
              for e in metrics.get("evals", [])]
    train = metrics["train"]
    cuda = str(train.get("peak_memory_of", "")).startswith("cuda")
    out.update(curve=curve, accuracy=scored["tuned"]["accuracy"], f1=scored["tuned"]["f1"],
               base_accuracy=scored["base"]["accuracy"], base_f1=scored["base"]["f1"],
               accuracy_of=accuracy_of,
               snapshot_accuracy=metrics["tuned"]["accuracy"], snapshot_base_accuracy=metrics["base"]["accuracy"],
               trainable_params=metrics["params"]["trainable_params"], total_params=metrics["params"]["total_params"],
               cuda_peak_bytes=int(train["peak_memory_mb"] * 2**20) if cuda and "peak_memory_mb" in train else None,
               train_seconds=train.get("train_seconds"), threads=train.get("threads_per_process"),
               precision=train.get("precision", s["precision"]), precision_ratio=train.get("precision_ratio"))
    if s["method"] != "full" and out["trainable_params"] >= out["total_params"]:
        raise ValueError(f"the engine trained all {out['total_params']:,} parameters for method {s['method']}")
    return out


def read_trainer(run_dir: Path, s: dict) -> dict:
    bench = json.loads((run_dir / "bench.json").read_text())
    f_real, f_pad = bench.get("token_factor", [1.0, 1.0])
    line = [[r[0], r[1], r[2], r[3] * f_real, r[4] * f_pad] for r in bench["timeline"]]
    out = timed(line, s["warmup_steps"])
    final = bench.get("final") or {}
    # the blog's closing trainer.evaluate() repeats the last in-training eval when eval_steps divides the run
    evals = {e["step"]: e for e in bench["evals"] if e.get("accuracy") is not None}
    out.update(curve=[{"step": e["step"], "t": round(e["t"], 3), "accuracy": e["accuracy"]} for e in evals.values()],
               accuracy=final.get("accuracy"), f1=final.get("f1"),
               trainable_params=bench["params"]["trainable_params"], total_params=bench["params"]["total_params"],
               cuda_peak_bytes=bench.get("cuda_peak_bytes"), train_seconds=line[-1][1], threads=bench.get("threads"),
               precision=bench.get("precision", s["precision"]), precision_ratio=bench.get("precision_ratio"))
    return out


# --------------------------------------------------------------------------------------------
# Records


# what a probe matmul can miss: fp16 on a CPU without fp16 units is emulated, and the probe's
# square matmul of fp16 tensors takes another (slower) path than autocast's fp16 linear layers
MFU_ABOVE_PEAK = ("not given: the run beat the probe's peak for this precision, so the probe did not measure "
                  "the kernels training used")


def summarize(s: dict, runs: list[dict], shape, peaks: dict, datasheet: dict | None, load_cap: float) -> dict:
    """One record per scenario from its repeats: medians of rates, the spread of step times."""
    ok = [r for r in runs if r["status"] == "ok"]
    failed = [r for r in runs if r["status"] != "ok"]
    rec = {"id": s["id"], "scenario": {k: v for k, v in s.items() if k != "id"},
           "status": "ok" if runs and not failed else (failed[0]["status"] if failed else "not run: no repeats"),
           "samples_per_s": None, "real_tokens_per_s": None, "padded_tokens_per_s": None, "padding_share": None,
           "step_time_s": None, "mean_real_len": None, "flops_per_token": None, "achieved_flops": None,
           "mfu": None, "mfu_note": None, "mfu_datasheet": None, "peak_memory_bytes": None, "peak_memory_of": None,
           "trainable_params": None, "total_params": None,
           "non_embedding_params": shape.non_embedding_params if shape else None,
           "accuracy": None, "f1": None, "base_accuracy": None, "base_f1": None,
           "target_accuracy": s["target_accuracy"], "time_to_target_s": None,
           "curve": None, "ratio_to_baseline": None, "baseline_id": s.get("baseline_id"),
           # what ran: the scenario's precision, or what auto resolved to on this machine (and the
           # measured bf16/fp32 matmul ratio that decided it)
           "precision": s["precision"] if s["precision"] != "auto" else None, "precision_ratio": None,
           "load": None, "disturbed": False, "repeats": runs}
    if not ok:
        return rec
    med = lambda key: statistics.median(r[key] for r in ok)  # noqa: E731
    steps = [t for r in ok for t in r["step_times"]]
    rec.update(samples_per_s=med("samples_per_s"), real_tokens_per_s=med("real_tokens_per_s"),
               padded_tokens_per_s=med("padded_tokens_per_s"), padding_share=med("padding_share"),
               mean_real_len=med("mean_real_len"),
               step_time_s={"median": statistics.median(steps), "min": min(steps), "max": max(steps),
                            "steps": len(steps)},
               samples_per_s_range=[min(r["samples_per_s"] for r in ok), max(r["samples_per_s"] for r in ok)],
               trainable_params=ok[0]["trainable_params"], total_params=ok[0]["total_params"],
               precision=ok[0].get("precision", s["precision"]), precision_ratio=ok[0].get("precision_ratio"))
    cuda = [r["cuda_peak_bytes"] for r in ok if r.get("cuda_peak_bytes")]
    if cuda:
        rec.update(peak_memory_bytes=max(cuda), peak_memory_of="cuda max_memory_allocated (largest rank)")
    else:
        rec.update(peak_memory_bytes=max(max(r["tree_peak_rss_bytes"], r["max_process_rss_bytes"]) for r in ok),
                   peak_memory_of="max RSS of the process tree (sum over processes, sampled)")
    if shape:
        fpt = measure.flops_per_token(shape.non_embedding_params, shape.layers, shape.hidden, rec["mean_real_len"])
        achieved = fpt * rec["real_tokens_per_s"]
        peak = (peaks.get(rec["precision"]) or {}).get("flops")
        rec.update(flops_per_token=fpt, achieved_flops=achieved, mfu=achieved / peak if peak else None)
        if rec["mfu"] is not None and rec["mfu"] > 1:
            rec.update(mfu=None, mfu_note=MFU_ABOVE_PEAK)
        if datasheet and datasheet.get(rec["precision"]):
            rec["mfu_datasheet"] = achieved / datasheet[rec["precision"]]
    if s["epochs"] is not None:  # trained to the end: its accuracy means something
        first = ok[0]
        rec.update(accuracy=med("accuracy") if all(r["accuracy"] is not None for r in ok) else None,
                   f1=med("f1") if all(r["f1"] is not None for r in ok) else None, curve=first["curve"])
        if all(r.get("base_accuracy") is not None for r in ok):  # the engine scores the untouched model first
            rec.update(base_accuracy=med("base_accuracy"), base_f1=med("base_f1"))
        if all(r.get("snapshot_accuracy") is not None for r in ok):
            rec.update(accuracy_of=first["accuracy_of"], snapshot_accuracy=med("snapshot_accuracy"),
                       snapshot_base_accuracy=med("snapshot_base_accuracy"))
        if s["target_accuracy"] is not None:
            hits = [min((p["t"] for p in r["curve"] if p["accuracy"] >= s["target_accuracy"]), default=None)
                    for r in ok]
            rec["time_to_target_s"] = statistics.median(hits) if all(h is not None for h in hits) else None
    loads = [r["load"] for r in runs if r.get("load")]
    if loads:
        outside = [l["outside_cores"] for l in loads]
        rec["load"] = {"outside_cores_mean": round(statistics.mean(outside), 3), "outside_cores_max": max(outside),
                       "own_cores_mean": round(statistics.mean(l["own_cores"] for l in loads), 3),
                       "threshold_cores": load_cap}
        rec["disturbed"] = any(r.get("disturbed") for r in runs)
    return rec


def one_run(prep: Preparer, s: dict, repeat: int, work: Path, keep: bool, load_cap: float) -> dict:
    run_dir = work / "runs" / s["id"] / f"r{repeat}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cmd = prep.command(s, run_dir)
    res = execute(cmd, prep.env(s), run_dir, s["timeout_s"])
    run = {"repeat": repeat, "command": " ".join(cmd), "run_dir": str(run_dir), "wall_s": res["wall_s"],
           "tree_peak_rss_bytes": res["tree_peak_rss_bytes"], "max_process_rss_bytes": res["max_process_rss_bytes"],
           "own_cpu_s": res["own_cpu_s"], "load": res["load"],
           "disturbed": bool(res["load"] and res["load"]["outside_cores"] > load_cap)}
    if res["returncode"] == 2 and not res["timed_out"]:
        # the engine's "bad input" exit: it refused this combination before any work
        run["status"] = f"not run: {failure_reason(run_dir, res)}"
    elif res["returncode"] != 0:
        run["status"] = f"failed: {failure_reason(run_dir, res)}"
    else:
        try:
            run.update((read_engine if s["runner"] == "engine" else read_trainer)(run_dir, s))
            run["status"] = "ok"
        except (OSError, KeyError, ValueError, ZeroDivisionError) as e:
            run["status"] = f"failed: {e.__class__.__name__}: {' '.join(str(e).split())[:250]}"
    if not keep:  # weights are large and not results: keep logs, metrics and outputs only
        for name in ("base", "tuned", "adapter", "checkpoints", "trainer", "tb"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
    return run


def ratios(records: list[dict]) -> None:
    by_id = {r["id"]: r for r in records}
    for r in records:
        b = by_id.get(r["baseline_id"]) if r["baseline_id"] else None
        if b and b["status"] == "ok" and r["status"] == "ok" and b["samples_per_s"]:
            r["ratio_to_baseline"] = r["samples_per_s"] / b["samples_per_s"]


# --------------------------------------------------------------------------------------------


def probe(work: Path) -> dict:
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe.py")], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"benchmarks/probe.py failed: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def dry_precision(s: dict) -> str:
    """The scenario's precision; for auto, what it resolves to on this machine (the cached probe)."""
    if s["precision"] != "auto":
        return s["precision"]
    import torch

    from engine.precision import choose

    threads = torch.get_num_threads()
    torch.set_num_threads(s["threads"] or max(1, len(measure.usable_cpus()) // s["nproc"]))
    try:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return f"auto (here: {choose('auto', device, say=lambda text: None).name})"
    finally:
        torch.set_num_threads(threads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrix", required=True, help="benchmarks/matrices/X.yaml")
    parser.add_argument("--out", required=True, help="results folder (results.json, results.md, plots)")
    parser.add_argument("--work", help="runs, built models and caches (default: benchmarks/.work/<out name>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="pin a setting in every scenario, e.g. repeats=1 or data.train_size=64")
    parser.add_argument("--only", metavar="REGEX", help="run only the scenarios whose id matches (and their baselines)")
    parser.add_argument("--dry-run", action="store_true", help="list the scenarios and stop")
    parser.add_argument("--keep-runs", action="store_true", help="keep each run's base/ and tuned/ weights")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    args = parser.parse_args()

    matrix = load_matrix(args.matrix, args.set)
    scenarios = matrix["scenarios"]
    if args.only:
        try:
            pattern = re.compile(args.only)
        except re.error as e:
            raise Fatal(f"--only {args.only!r}: not a regular expression ({e})") from None
        keep = [s for s in scenarios if pattern.search(s["id"])]
        needed = {s.get("baseline_id") for s in keep}
        scenarios = [s for s in scenarios if s in keep or s["id"] in needed]
        if not scenarios:
            raise Fatal(f"--only {args.only!r} matches no scenario of {args.matrix}")
    if args.dry_run:
        for s in scenarios:
            what = f"{s['runner']} {s['strategy']}x{s['nproc']} {s['method']} {dry_precision(s)}"
            print(f"{s['id']:<40} {what}  baseline: {s.get('baseline_id') or '-'}  repeats {s['repeats']}")
        return 0
    out = Path(args.out)
    if (out / "results.json").exists() and not args.overwrite:
        raise Fatal(f"{out}: holds results already; pick another --out or pass --overwrite")
    work = Path(args.work) if args.work else ROOT / "benchmarks" / ".work" / out.name
    try:
        out.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Fatal(f"cannot create {out} or {work}: {e}") from None

    started, run_cpu0 = measure.now_iso(), measure.read_cpu_times()
    t0, self0 = time.perf_counter(), measure.self_cpu_s()
    print(f"{matrix['name']}: {len(scenarios)} scenarios; measuring the peak matmul rates", flush=True)
    probe_start = probe(work)
    gpus = probe_start["gpus"]
    prep = Preparer(work, len(gpus))
    load_cap = matrix["max_outside_load"]

    runs: dict[str, list] = {s["id"]: [] for s in scenarios}
    skipped: dict[str, str] = {}
    shapes: dict[str, object] = {}
    for s in scenarios:
        reason = prep.why_not(s)
        if reason is None:
            try:
                shapes[s["id"]] = prep.shape(prep.model_path(s["model"]))
                prep.data_source(s["data"])
            except (NotRunnable, BuildError) as e:
                reason = str(e)
        if reason:
            skipped[s["id"]] = f"not run: {reason}"
    todo = [(r, s) for r in range(max(s["repeats"] for s in scenarios))
            for s in sorted(scenarios, key=lambda s: not s.get("is_baseline"))
            if r < s["repeats"] and s["id"] not in skipped]
    # ctrl-C or SIGTERM an hour into a matrix: stop the run in flight (execute kills its process
    # tree), then write what finished, marked interrupted, rather than nothing
    interrupted = None
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        for i, (repeat, s) in enumerate(todo, 1):
            run = one_run(prep, s, repeat + 1, work, args.keep_runs, load_cap)
            runs[s["id"]].append(run)
            rate = f"{run['samples_per_s']:.2f} samples/s" if run["status"] == "ok" else run["status"]
            load = run["load"]["outside_cores"] if run["load"] else float("nan")
            flag = "  DISTURBED" if run["disturbed"] else ""
            print(f"[{i}/{len(todo)}] {s['id']} r{repeat + 1}: {rate}; outside load {load:.2f} cores; "
                  f"{run['wall_s']:.0f}s{flag}", flush=True)
        probe_end = probe(work)
    except KeyboardInterrupt:
        done = sum(len(r) for r in runs.values())
        interrupted = f"interrupted after {done} of {len(todo)} runs"
        print(f"{interrupted}: writing what finished", flush=True)
        probe_end = probe_start

    peaks = {}
    for name in ("fp32", "bf16", "fp16"):
        found = [p["peak"][name] for p in (probe_start, probe_end) if name in p["peak"]]
        if found:
            best = max(found, key=lambda x: x["flops"])
            peaks[name] = {**best, "start": found[0]["flops"], "end": found[-1]["flops"]}
    datasheet = measure.datasheet_peak(gpus[0]["name"]) if gpus else None
    records = []
    for s in scenarios:
        if s["id"] in skipped or (interrupted and not runs[s["id"]]):
            rec = summarize(s, [], None, peaks, datasheet, load_cap)
            rec["status"] = skipped.get(s["id"], "not run: the matrix was interrupted first")
        else:
            rec = summarize(s, runs[s["id"]], shapes.get(s["id"]), peaks, datasheet, load_cap)
        records.append(rec)
    ratios(records)

    whole = None
    run_cpu1 = measure.read_cpu_times()
    if run_cpu0 and run_cpu1:
        import resource
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = kids.ru_utime + kids.ru_stime + measure.self_cpu_s() - self0
        whole = measure.outside_load(run_cpu0, run_cpu1, own, time.perf_counter() - t0)
    hardware = {"cpu": measure.cpu_fingerprint(), "gpus": gpus, "gpu_driver": measure.gpu_driver() if gpus else None,
                **{k: probe_start.get(k) for k in ("torch", "cuda", "cudnn", "transformers", "python",
                                                   "cpu_capability", "float32_matmul_precision")}}
    results = {
        "matrix": matrix["name"], "matrix_path": matrix["path"], "description": matrix["description"],
        "sets": matrix["sets"], "only": args.only, "started": started, "finished": measure.now_iso(),
        "interrupted": interrupted,
        "git": measure.git_state(ROOT), "hardware": hardware,
        "peak_flops": {"measured": peaks, "datasheet": datasheet, "probe_errors": probe_start.get("errors")},
        "load": {"whole_run": whole, "threshold_cores": load_cap,
                 "disturbed": any(r["disturbed"] for r in records)},
        "mfu_formula": measure.MFU_FORMULA, "records": records,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    from benchmarks import report
    report.write(results, out)
    ok = sum(r["status"] == "ok" for r in records)
    print(f"{ok}/{len(records)} scenarios ok; {out / 'results.md'}"
          + ("; WARNING: some runs were disturbed by outside load" if results["load"]["disturbed"] else "")
          + (f"; {interrupted}" if interrupted else ""))
    return 130 if interrupted else 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (MatrixError, Fatal) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
