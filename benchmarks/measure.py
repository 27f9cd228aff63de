"""What the harness measures beside the engine's own logs: FLOPs and MFU, machine load, memory, hardware.

Plain functions over numbers and /proc text, so the tests can check them without running anything.
"""
from __future__ import annotations

import os
import platform
import re
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from engine.hardware import read_cpuinfo

MFU_FORMULA = (
    "FLOPs per token = 6 x N + 12 x L x H x S (forward + backward), where N = non-embedding "
    "parameters (every parameter outside nn.Embedding modules: attention, MLP, LayerNorm, pooler, "
    "head), L = layers, H = hidden size, S = mean real (non-padding) sequence length of the timed "
    "steps. Achieved FLOP/s = FLOPs per token x real tokens/s (padding is not useful work, so a run "
    "that pads more gets a lower MFU). MFU = achieved FLOP/s / peak FLOP/s of the scenario's "
    "precision, where the peak is measured in the same run by a large matmul on all the cores (or "
    "the GPU) the run uses; mfu_datasheet divides by the vendor's dense peak instead, for known GPUs. "
    "The same count serves every method: LoRA/QLoRA skip the frozen weights' gradients (about 4N "
    "instead of 6N), so for them MFU states the speed in full fine-tuning FLOPs, not hardware use."
)

# dense (no sparsity) tensor-core peaks from the vendors' datasheets, FLOP/s; fp32 is plain FP32
# (not TF32), which is what torch runs fp32 matmuls in unless told otherwise
DATASHEET_PEAKS = [
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
]

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


# --------------------------------------------------------------------------------------------
# FLOPs


def flops_per_token(non_embedding_params: int, layers: int, hidden: int, seq_len: float) -> float:
    """Training FLOPs per token: 6N for the weights, 12*L*H*S for attention scores and values."""
    return 6.0 * non_embedding_params + 12.0 * layers * hidden * seq_len


@dataclass
class ModelShape:
    non_embedding_params: int
    total_params: int
    layers: int
    hidden: int
    model_type: str


def model_shape(folder: str) -> ModelShape:
    """Parameter counts and dimensions of a model folder, without loading its weights."""
    # torch and transformers take seconds to import: loaded here, not for every /proc reading
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = AutoModelForSequenceClassification.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding)
                    for p in m.parameters(recurse=False))
    # attribute_map makes DistilBERT's n_layers/dim answer to these names too
    return ModelShape(total - embedding, total, int(config.num_hidden_layers), int(config.hidden_size),
                      config.model_type)


def datasheet_peak(gpu_name: str | None) -> dict | None:
    if not gpu_name:
        return None
    for key, peaks in DATASHEET_PEAKS:
        if key.lower() in gpu_name.lower():
            return dict(peaks)
    return None


# --------------------------------------------------------------------------------------------
# Machine load from /proc/stat


@dataclass
class CpuTimes:
    busy: int  # jiffies: user + nice + system + irq + softirq + steal (steal: another VM had the core)
    total: int  # busy + idle + iowait
    cpus: int


def parse_proc_stat(text: str, cpus: set[int] | None = None) -> CpuTimes:
    """Sum the per-CPU lines of /proc/stat, for the CPUs in `cpus` (all when None)."""
    busy = total = n = 0
    for line in text.splitlines():
        m = re.match(r"cpu(\d+)\s+(.*)", line)
        if not m or (cpus is not None and int(m.group(1)) not in cpus):
            continue
        v = [int(x) for x in m.group(2).split()] + [0] * 10
        user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
        # guest time is already inside user/nice: not added again
        b = user + nice + system + irq + softirq + steal
        busy += b
        total += b + idle + iowait
        n += 1
    if n == 0:
        raise ValueError("no per-CPU lines in /proc/stat text")
    return CpuTimes(busy, total, n)


def usable_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:
        return set(range(os.cpu_count() or 1))


def read_cpu_times(cpus: set[int] | None = None) -> CpuTimes | None:
    try:
        return parse_proc_stat(Path("/proc/stat").read_text(), cpus if cpus is not None else usable_cpus())
    except (OSError, ValueError):
        return None  # not Linux: load is then unknown, never guessed


def clock_ticks() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return 100


def outside_load(before: CpuTimes, after: CpuTimes, own_cpu_s: float, wall_s: float,
                 ticks: int | None = None) -> dict:
    """Cores' worth of CPU that processes outside ours used, on average over `wall_s`.

    The machine's busy time over the interval minus our own process tree's CPU time; what is left
    was taken by someone else (another user's tests, a VM neighbour's steal time).
    """
    ticks = ticks or clock_ticks()
    busy_s = (after.busy - before.busy) / ticks
    wall_s = max(wall_s, 1e-9)
    outside_s = max(0.0, busy_s - own_cpu_s)
    return {"outside_cores": round(outside_s / wall_s, 3), "own_cores": round(own_cpu_s / wall_s, 3),
            "machine_busy_cores": round(busy_s / wall_s, 3), "cores": after.cpus, "wall_s": round(wall_s, 2)}


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --------------------------------------------------------------------------------------------
# The process tree's memory


def tree_pids(root: int) -> list[int]:
    """`root` and all its descendants now alive (torchrun's workers are its children)."""
    seen, todo = [], [root]
    while todo:
        pid = todo.pop()
        seen.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                todo.extend(int(c) for c in children if int(c) not in seen)
        except OSError:
            continue  # gone in between: it holds no memory any more
    return seen


PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def tree_rss_bytes(root: int) -> int:
    """Resident memory of the whole tree now: the sum over processes, as DDP ranks add up."""
    total = 0
    for pid in tree_pids(root):
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


# --------------------------------------------------------------------------------------------
# Hardware fingerprint (the parts /proc and the shell know; probe.py adds torch's)


def cpu_fingerprint() -> dict:
    info = {"model": platform.processor() or None, "logical_cores": os.cpu_count(),
            "usable_cores": len(usable_cpus()), "flags": [], "sockets": None, "memory_bytes": None,
            "kernel": platform.release(), "machine": platform.machine()}
    cpu = read_cpuinfo()
    info["model"] = cpu.model or info["model"]
    info["flags"] = [f for f in ISA_FLAGS if f in set(cpu.flags)]
    info["sockets"] = cpu.sockets
    try:
        m = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        info["memory_bytes"] = int(m.group(1)) * 1024 if m else None
    except OSError:
        pass
    return info


def gpu_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_state(root: Path) -> dict:
    def git(*args):
        try:
            p = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
            return p.stdout.strip() if p.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
