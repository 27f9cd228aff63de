"""Running one process tree (a training run, the peak-rate probe), with its memory, CPU time and the
machine's load beside it; a run that overstays is killed with everything it started."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import measure

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_EVERY_S = 0.25  # memory sampling of the running tree: fine enough for allocations that last


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
    text = (run_dir / "stderr.txt").read_text(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # the engine's CLIs end with one line that says why; skip torchrun's and libraries' chatter after it
    for line in reversed(lines):
        if re.match(r"^(error|stopped|failed|rank \d+: failed|\w*Error)\b", line):
            return line[:300]
    return (lines[-1][:300] if lines else f"exit code {result['returncode']}")


def probe(work: Path) -> dict:
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe.py")], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"benchmarks/probe.py failed: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])
