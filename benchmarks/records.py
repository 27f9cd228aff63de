"""Records: one per scenario from its runs (medians of rates, spread of step times, MFU against the
probed peaks, accuracy and time to target), the ratios to baselines, and results.json as a whole."""
from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

from benchmarks import measure
from engine.metrics import standard_error

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
    def med(key: str) -> float:
        return statistics.median(r[key] for r in ok)

    steps = [t for r in ok for t in r["step_times"]]
    rec.update(samples_per_s=med("samples_per_s"), real_tokens_per_s=med("real_tokens_per_s"),
               padded_tokens_per_s=med("padded_tokens_per_s"), padding_share=med("padding_share"),
               mean_real_len=med("mean_real_len"),
               step_time_s={"median": statistics.median(steps), "min": min(steps), "max": max(steps),
                            "steps": len(steps)},
               samples_per_s_range=[min(r["samples_per_s"] for r in ok), max(r["samples_per_s"] for r in ok)],
               trainable_params=ok[0]["trainable_params"], total_params=ok[0]["total_params"],
               precision=ok[0].get("precision", s["precision"]), precision_ratio=ok[0].get("precision_ratio"))
    for key in ("train_samples_per_s", "compile_seconds", "compile_graphs", "run_wall_seconds"):
        if all(r.get(key) is not None for r in ok):  # the engine's: the Trainer's runs have none
            rec[key] = med(key)
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
        n = first.get("eval_n")
        if n:  # the binomial standard error of one run's accuracy on n examples, at the median
            rec.update(eval_n=n, **{f"{key}_se": standard_error(rec[key], n) for key in ("accuracy", "base_accuracy")
                                    if rec.get(key) is not None})
        if all(r.get("snapshot_accuracy") is not None for r in ok):
            rec.update(accuracy_of=first["accuracy_of"], snapshot_accuracy=med("snapshot_accuracy"),
                       snapshot_base_accuracy=med("snapshot_base_accuracy"))
        if s["target_accuracy"] is not None:
            hits = [min((p["t"] for p in r["curve"] if p["accuracy"] >= s["target_accuracy"]), default=None)
                    for r in ok]
            rec["time_to_target_s"] = statistics.median(hits) if all(h is not None for h in hits) else None
    loads = [r["load"] for r in runs if r.get("load")]
    if loads:
        outside = [load["outside_cores"] for load in loads]
        rec["load"] = {"outside_cores_mean": round(statistics.mean(outside), 3), "outside_cores_max": max(outside),
                       "own_cores_mean": round(statistics.mean(load["own_cores"] for load in loads), 3),
                       "threshold_cores": load_cap}
        rec["disturbed"] = any(r.get("disturbed") for r in runs)
    return rec


def ratios(records: list[dict]) -> None:
    by_id = {r["id"]: r for r in records}
    for r in records:
        b = by_id.get(r["baseline_id"]) if r["baseline_id"] else None
        if b and b["status"] == "ok" and r["status"] == "ok" and b["samples_per_s"]:
            r["ratio_to_baseline"] = r["samples_per_s"] / b["samples_per_s"]


def peak_rates(probe_start: dict, probe_end: dict) -> dict:
    """Per precision, the better of the probes before and after the matrix (and both readings)."""
    peaks = {}
    for name in ("fp32", "bf16", "fp16"):
        found = [p["peak"][name] for p in (probe_start, probe_end) if name in p["peak"]]
        if found:
            best = max(found, key=lambda x: x["flops"])
            peaks[name] = {**best, "start": found[0]["flops"], "end": found[-1]["flops"]}
    return peaks


def build_records(scenarios: list[dict], runs: dict, skipped: dict, shapes: dict, interrupted: str | None,
                  peaks: dict, datasheet: dict | None, load_cap: float) -> list[dict]:
    records = []
    for s in scenarios:
        if s["id"] in skipped or (interrupted and not runs[s["id"]]):
            rec = summarize(s, [], None, peaks, datasheet, load_cap)
            rec["status"] = skipped.get(s["id"], "not run: the matrix was interrupted first")
        else:
            rec = summarize(s, runs[s["id"]], shapes.get(s["id"]), peaks, datasheet, load_cap)
        records.append(rec)
    ratios(records)
    return records


def whole_run_load(run_cpu0, t0: float, self0: float) -> dict | None:
    """The machine's load over the whole matrix, our own processes (and their children) taken out."""
    run_cpu1 = measure.read_cpu_times()
    if not (run_cpu0 and run_cpu1):
        return None
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = kids.ru_utime + kids.ru_stime + measure.self_cpu_s() - self0
    return measure.outside_load(run_cpu0, run_cpu1, own, time.perf_counter() - t0)


def results(matrix: dict, only: str | None, started: str, interrupted: str | None, root: Path, probe_start: dict,
            peaks: dict, datasheet: dict | None, whole: dict | None, records: list[dict]) -> dict:
    """results.json: what ran, where, on what, and its records."""
    gpus = probe_start["gpus"]
    hardware = {"cpu": measure.cpu_fingerprint(), "gpus": gpus, "gpu_driver": measure.gpu_driver() if gpus else None,
                **{k: probe_start.get(k) for k in ("torch", "cuda", "cudnn", "transformers", "python",
                                                   "cpu_capability", "float32_matmul_precision")}}
    load_cap = matrix["max_outside_load"]
    return {
        "matrix": matrix["name"], "matrix_path": matrix["path"], "description": matrix["description"],
        "sets": matrix["sets"], "only": only, "started": started, "finished": measure.now_iso(),
        "interrupted": interrupted,
        "git": measure.git_state(root), "hardware": hardware,
        "peak_flops": {"measured": peaks, "datasheet": datasheet, "probe_errors": probe_start.get("errors")},
        "load": {"whole_run": whole, "threshold_cores": load_cap,
                 "disturbed": any(r["disturbed"] for r in records)},
        "mfu_formula": measure.MFU_FORMULA, "records": records,
    }
