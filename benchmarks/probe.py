"""Measure the hardware's peak matmul FLOP/s per precision and describe torch's view of the machine.

    python benchmarks/probe.py [--seconds 1.0]   -> one JSON object on stdout

Run in a fresh process by benchmarks/run.py at the start and the end of a run, so MFU divides by a
peak measured on the same machine, under the same load, as the scenarios.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

DTYPES = ("fp32", "bf16", "fp16")


def _matmul_seconds(n: int, dtype, device, reps: int) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.matmul(a, b)
    sync()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(4 if device.type == "cuda" else 1):  # GPU: amortise the launch and the sync
            torch.matmul(a, b)
        sync()
        best = min(best, (time.perf_counter() - start) / (4 if device.type == "cuda" else 1))
    return best


def peak_flops(name: str, device, budget_s: float) -> dict:
    """Best FLOP/s of square matmuls, growing n until one takes long enough to reach the peak."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    n, top = 256, (8192 if device.type == "cuda" else 4096)
    # small matmuls never reach the peak (overheads, cache); stop growing at ~50 ms per matmul, so
    # a precision the hardware only emulates (fp16 on most CPUs) stays small and quick
    while n < top and _matmul_seconds(n, dtype, device, 2) < 0.05:
        n *= 2
    one = _matmul_seconds(n, dtype, device, 1)
    reps = max(2, min(20, int(budget_s / max(one, 1e-6))))
    seconds = _matmul_seconds(n, dtype, device, reps)
    return {"flops": 2.0 * n ** 3 / seconds, "n": n, "seconds": seconds, "reps": reps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=0.6, help="time budget per precision")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        try:
            torch.set_num_threads(len(os.sched_getaffinity(0)))  # the peak of all the cores a run may use
        except AttributeError:
            pass
    out = {
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": sys.version.split()[0], "threads": torch.get_num_threads(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "gpus": [], "peak": {}, "errors": {},
    }
    try:
        import transformers  # optional here: the probe measures torch, transformers is only reported
        out["transformers"] = transformers.__version__
    except ImportError:
        out["transformers"] = None
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["gpus"].append({"name": p.name, "memory_bytes": p.total_memory,
                                "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count})
    for name in DTYPES:
        try:
            out["peak"][name] = peak_flops(name, device, args.seconds)
        except Exception as e:  # noqa: BLE001 - a dtype the hardware lacks: say so, keep the others
            out["errors"][name] = f"{e.__class__.__name__}: {' '.join(str(e).split())[:200]}"
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
