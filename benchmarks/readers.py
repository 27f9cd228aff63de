"""Reading what a run wrote: the engine's log.jsonl and metrics.json, the Trainer baseline's bench.json,
into one shape: a timeline of [step, training seconds, samples, real tokens, padded tokens] and the rates
over its timed steps (warm-up cut off)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def engine_timeline(run_dir: Path, s: dict, metrics: dict) -> list[list[float]]:
    """[step, clock seconds, samples, real tokens, padded tokens], cumulative, from log.jsonl.

    The engine logs its training clock (train/seconds: evaluation and checkpoints paused) and its
    tokens/s cumulative over that clock; at step k the job has trained k x global batch examples.
    """
    per_step = s["batch_size"] * s["grad_accum"]  # global: every process's share
    rows = [[0, 0.0, 0.0, 0.0, 0.0]]
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/samples_per_s" not in rec:
            continue  # an eval line
        if "train/seconds" not in rec:
            raise ValueError(f"{run_dir / 'log.jsonl'}: step {rec['step']} has no train/seconds (the engine's "
                             f"training clock); an engine older than this harness")
        step, t = rec["step"], rec["train/seconds"]
        real = rec["train/tokens_per_s"] * t
        share = rec.get("train/padding_share", 0.0)
        rows.append([step, t, step * per_step, real, real / (1 - share) if share < 1 else real])
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
    for prev, cur in zip(timeline[origin:], timeline[origin + 1:], strict=False):
        steps.append((cur[1] - prev[1]) / (cur[0] - prev[0]))  # a window of log_every steps: per step
    samples, real, padded = b[2] - a[2], b[3] - a[3], b[4] - a[4]
    return {"timed_steps": b[0] - a[0], "timed_seconds": secs, "samples_per_s": samples / secs,
            "real_tokens_per_s": real / secs, "padded_tokens_per_s": padded / secs, "step_times": steps,
            "mean_real_len": real / samples if samples else 0.0,
            "padding_share": 1 - real / padded if padded else 0.0}


def clock_at(timeline: list, step: float) -> float:
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
               eval_n=scored["tuned"].get("n"), accuracy_of=accuracy_of,
               snapshot_accuracy=metrics["tuned"]["accuracy"], snapshot_base_accuracy=metrics["base"]["accuracy"],
               trainable_params=metrics["params"]["trainable_params"], total_params=metrics["params"]["total_params"],
               cuda_peak_bytes=int(train["peak_memory_mb"] * 2**20) if cuda and "peak_memory_mb" in train else None,
               train_seconds=train.get("train_seconds"), threads=train.get("threads_per_process"),
               precision=train.get("precision", s["precision"]), precision_ratio=train.get("precision_ratio"),
               # the run's own clock, by part (load, tokenize, base_eval, train, tuned_eval, save, other)
               run_wall_seconds=metrics.get("wall_seconds"), time_parts=metrics.get("time_parts"),
               # over the whole training clock, warm-up and compiling inside the steps included: what a
               # run of this length gets, where samples_per_s above leaves the warm-up steps out
               train_samples_per_s=train.get("samples_per_s"),
               # a compiled run's graphs and compile seconds (rank 0's process), None when eager
               compile_graphs=train.get("compile_graphs"), compile_seconds=train.get("compile_seconds"))
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
               accuracy=final.get("accuracy"), f1=final.get("f1"), eval_n=bench.get("eval_n"),
               trainable_params=bench["params"]["trainable_params"], total_params=bench["params"]["total_params"],
               cuda_peak_bytes=bench.get("cuda_peak_bytes"), train_seconds=line[-1][1], threads=bench.get("threads"),
               precision=bench.get("precision", s["precision"]), precision_ratio=bench.get("precision_ratio"))
    return out
