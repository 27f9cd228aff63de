"""Run a benchmark matrix: every scenario in fresh processes, through launch/train.py as a user runs it.

    python benchmarks/run.py --matrix benchmarks/matrices/cpu_smoke.yaml --out benchmarks/results/NAME
        [--set repeats=1 ...] [--only REGEX] [--work DIR] [--dry-run] [--keep-runs] [--overwrite]

--dry-run lists the scenarios and checks each command's settings (recipe overrides, trainer_args)
without running anything: exit code 2 when one would be refused.

Each scenario runs `python launch/train.py --recipe <empty> key=value...` (under torchrun when
nproc > 1), or benchmarks/trainer_baseline.py for the Hugging Face Trainer. Repeats are
interleaved (all scenarios once, then all again) so a slow spell of the machine does not land on
one scenario. Timings come from the engine's own log.jsonl (one line per step with the default
log_every 1): its training clock (train/seconds) at every logged step; warm-up steps are cut off
from that. Writes OUT/results.json, OUT/results.md and PNG plots (benchmarks/report.py).

The parts: benchmarks/matrix.py (the matrix file), prepare.py (a scenario's model, data, command),
process.py (running a process tree), readers.py (what a run wrote), records.py (results.json).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import sys
import time
from pathlib import Path

# a script run by path: put the repository root first so `benchmarks` and `engine` import from it
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import measure, records, report
from benchmarks.build import BuildError
from benchmarks.matrix import MatrixError, load_matrix
from benchmarks.prepare import NotRunnable, Preparer, dry_precision, invalid_settings
from benchmarks.process import ROOT, execute, failure_reason, probe
from benchmarks.readers import read_engine, read_trainer


class Fatal(ValueError):
    """Bad input to the harness itself (output folder, work folder); one line, exit 2."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrix", required=True, help="benchmarks/matrices/X.yaml")
    parser.add_argument("--out", required=True, help="results folder (results.json, results.md, plots)")
    parser.add_argument("--work", help="runs, built models and caches (default: benchmarks/.work/<out name>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="pin a setting in every scenario, e.g. repeats=1 or data.train_size=64")
    parser.add_argument("--only", metavar="REGEX",
                        help="run only the scenarios whose id matches (and their baselines)")
    parser.add_argument("--dry-run", action="store_true", help="list the scenarios and stop")
    parser.add_argument("--keep-runs", action="store_true", help="keep each run's base/ and tuned/ weights")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    return parser.parse_args()


def select(scenarios: list[dict], only: str | None, matrix_path: str) -> list[dict]:
    """The scenarios --only names, with the baselines they are compared to."""
    if not only:
        return scenarios
    try:
        pattern = re.compile(only)
    except re.error as e:
        raise Fatal(f"--only {only!r}: not a regular expression ({e})") from None
    keep = [s for s in scenarios if pattern.search(s["id"])]
    needed = {s.get("baseline_id") for s in keep}
    scenarios = [s for s in scenarios if s in keep or s["id"] in needed]
    if not scenarios:
        raise Fatal(f"--only {only!r} matches no scenario of {matrix_path}")
    return scenarios


def folders(args: argparse.Namespace) -> tuple[Path, Path]:
    out = Path(args.out)
    if (out / "results.json").exists() and not args.overwrite:
        raise Fatal(f"{out}: holds results already; pick another --out or pass --overwrite")
    work = Path(args.work) if args.work else ROOT / "benchmarks" / ".work" / out.name
    try:
        out.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Fatal(f"cannot create {out} or {work}: {e}") from None
    return out, work


def check_runnable(prep: Preparer, scenarios: list[dict]) -> tuple[dict, dict]:
    """({id: "not run: why"} for what cannot run here, {id: model shape} for the rest), models built."""
    skipped, shapes = {}, {}
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
    return skipped, shapes


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


def run_all(prep: Preparer, todo: list, runs: dict, work: Path, keep: bool, load_cap: float) -> None:
    """Every (repeat, scenario) in order, one fresh process tree each, a line per run."""
    for i, (repeat, s) in enumerate(todo, 1):
        run = one_run(prep, s, repeat + 1, work, keep, load_cap)
        runs[s["id"]].append(run)
        rate = f"{run['samples_per_s']:.2f} samples/s" if run["status"] == "ok" else run["status"]
        load = run["load"]["outside_cores"] if run["load"] else float("nan")
        flag = "  DISTURBED" if run["disturbed"] else ""
        print(f"[{i}/{len(todo)}] {s['id']} r{repeat + 1}: {rate}; outside load {load:.2f} cores; "
              f"{run['wall_s']:.0f}s{flag}", flush=True)


def main() -> int:
    args = parse_args()
    matrix = load_matrix(args.matrix, args.set)
    scenarios = select(matrix["scenarios"], args.only, args.matrix)
    if args.dry_run:  # what each command would be refused for is checked here, not on the lent machine
        bad = 0
        for s in scenarios:
            what = f"{s['runner']} {s['strategy']}x{s['nproc']} {s['method']} {dry_precision(s)}"
            print(f"{s['id']:<40} {what}  baseline: {s.get('baseline_id') or '-'}  repeats {s['repeats']}")
            reason = invalid_settings(s)
            if reason:
                print(f"error: {args.matrix}: scenario {s['id']}: {reason}", file=sys.stderr)
                bad += 1
        return 2 if bad else 0
    out, work = folders(args)

    started, run_cpu0 = measure.now_iso(), measure.read_cpu_times()
    t0, self0 = time.perf_counter(), measure.self_cpu_s()
    print(f"{matrix['name']}: {len(scenarios)} scenarios; measuring the peak matmul rates", flush=True)
    probe_start = probe(work)
    gpus = probe_start["gpus"]
    prep = Preparer(work, len(gpus))
    load_cap = matrix["max_outside_load"]

    runs: dict[str, list] = {s["id"]: [] for s in scenarios}
    skipped, shapes = check_runnable(prep, scenarios)
    todo = [(r, s) for r in range(max(s["repeats"] for s in scenarios))
            for s in sorted(scenarios, key=lambda s: not s.get("is_baseline"))
            if r < s["repeats"] and s["id"] not in skipped]
    # ctrl-C or SIGTERM an hour into a matrix: stop the run in flight (execute kills its process
    # tree), then write what finished, marked interrupted, rather than nothing
    interrupted = None
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_all(prep, todo, runs, work, args.keep_runs, load_cap)
        probe_end = probe(work)
    except KeyboardInterrupt:
        done = sum(len(r) for r in runs.values())
        interrupted = f"interrupted after {done} of {len(todo)} runs"
        print(f"{interrupted}: writing what finished", flush=True)
        probe_end = probe_start

    peaks = records.peak_rates(probe_start, probe_end)
    datasheet = measure.datasheet_peak(gpus[0]["name"]) if gpus else None
    recs = records.build_records(scenarios, runs, skipped, shapes, interrupted, peaks, datasheet, load_cap)
    whole = records.whole_run_load(run_cpu0, t0, self0)
    results = records.results(matrix, args.only, started, interrupted, ROOT, probe_start, peaks, datasheet, whole,
                              recs)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report.write(results, out)
    ok = sum(r["status"] == "ok" for r in recs)
    print(f"{ok}/{len(recs)} scenarios ok; {out / 'results.md'}"
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
