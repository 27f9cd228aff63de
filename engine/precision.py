"""Mixed precision: which autocast dtype a step runs under, chosen from the hardware, and the fp16 loss scaler.

Weights and optimizer state stay fp32 (the master copy); autocast runs matmuls in bf16 or fp16.
fp16's narrow range needs a GradScaler that skips steps whose gradients overflowed; bf16 does not.
No step reads a value back to the host (engine/guard.py says how a non-finite step is handled).

`train.precision: auto` picks bf16 only where the hardware computes it natively: a CUDA device
with bf16 units, or a CPU whose bf16 matmul a short probe measures at least NATIVE_RATIO x fp32.
Many CPUs run bf16 by emulation, several times slower than fp32, so "supported" is not enough.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.errors import RecipeError
from engine.hardware import read_cpuinfo
from engine.paths import user_cache_dir, write_json_atomic

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_RATIO = 1.3  # bf16 matmul speed / fp32 at or above which a CPU counts as computing bf16 natively
PROBE_SIZE = 1024  # square matmul: big enough to reach the vector units' pace, ~0.1 s for the whole probe
PROBE_REPEATS = 3


@dataclass
class Choice:
    """What a run computes in, and why."""
    requested: str  # as the recipe said: auto | fp32 | bf16 | fp16
    name: str  # fp32 | bf16 | fp16
    ratio: float | None = None  # measured low-precision matmul speed / fp32 (CPU only)
    reason: str = ""

    def describe(self) -> str:
        return f"precision {self.name}" + (f" ({self.reason})" if self.reason else "")

    def as_dict(self) -> dict:
        return {"precision": self.name, "precision_requested": self.requested,
                "precision_ratio": None if self.ratio is None else round(self.ratio, 3),
                "precision_reason": self.reason}


def choose(requested: str, device: torch.device, broadcast: Callable = lambda x: x,
           say: Callable[[str], None] = print, main: bool = True,
           probe: Callable[[str, int], float] | None = None, key: str = "train.precision") -> Choice:
    """Resolve `requested` for this device. On CPU the matmul ratio is measured once per machine
    (cached); the main rank measures and `broadcast` hands its answer to the others, so all agree.
    `key`: what the user set it with, for the note (a recipe key, or predict's --precision)."""
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        if requested == "auto":
            why = "auto: this GPU has bf16 units" if native else "auto: this GPU has no bf16 units"
            return Choice(requested, "bf16" if native else "fp32", None, why)
        return Choice(requested, requested)  # bf16 without bf16 units: Precision refuses it
    if requested == "fp32":
        return Choice(requested, "fp32")
    low = "bf16" if requested == "auto" else requested
    ratio = broadcast(cpu_ratio(low, probe) if main else None)
    if requested == "auto":
        if ratio >= NATIVE_RATIO:
            return Choice(requested, "bf16", ratio, f"auto: bf16 matmul {ratio:.2f}x fp32 on this CPU")
        return Choice(requested, "fp32", ratio,
                      f"auto: bf16 matmul only {ratio:.2f}x fp32 on this CPU (emulated), so fp32")
    if ratio < NATIVE_RATIO:  # still runs (memory may be why it was asked for), but say what it costs
        speed = f"{1 / ratio:.1f}x slower" if ratio < 1 else "little faster"
        say(f"note: {key}={requested} on this CPU runs matmuls at {ratio:.2f}x fp32 ({speed}: "
            f"emulated, or not native); {key}=auto would choose fp32")
    return Choice(requested, requested, ratio, f"{requested} matmul {ratio:.2f}x fp32 on this CPU")


def cpu_ratio(low: str, probe: Callable[[str, int], float] | None = None) -> float:
    """`low`'s matmul speed over fp32's on this CPU at this thread count, cached per machine and torch."""
    threads = torch.get_num_threads()
    key = f"{machine_id()}|torch {torch.__version__}|threads {threads}|{low}"
    file = user_cache_dir() / "precision_probe.json"
    try:
        cached = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(cached, dict):
            cached = {}
    except (OSError, ValueError):  # absent or damaged: measure again
        cached = {}
    if isinstance(cached.get(key), (int, float)):
        return float(cached[key])
    measure = probe or matmul_seconds
    ratio = measure("fp32", threads) / measure(low, threads)
    cached[key] = ratio
    try:
        write_json_atomic(file, cached)
    except OSError:  # a read-only cache costs a probe per run, nothing else
        pass
    return ratio


def machine_id() -> str:
    """The CPU model and its feature flags: what decides whether bf16 is native."""
    cpu = read_cpuinfo()
    model = cpu.model or platform.processor() or platform.machine()
    return f"{model} flags {hashlib.sha256(' '.join(sorted(cpu.flags)).encode()).hexdigest()[:12]}"


def matmul_seconds(name: str, threads: int) -> float:
    """Median time of a PROBE_SIZE square matmul in `name`'s dtype, after one warm-up."""
    dtype = DTYPES[name] or torch.float32
    a = torch.randn(PROBE_SIZE, PROBE_SIZE).to(dtype)
    b = torch.randn(PROBE_SIZE, PROBE_SIZE).to(dtype)
    torch.mm(a, b)
    times = []
    for _ in range(PROBE_REPEATS):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class Precision:
    def __init__(self, name: str, device: torch.device):
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise RecipeError(f"train.precision=bf16: {torch.cuda.get_device_name(device)} has no bf16 units "
                              f"(autocast would emulate it, slowly); use train.precision=fp16 or fp32")
        self.name = name
        self.dtype = DTYPES[name]
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer) -> None:
        """Bring gradients back to their true size before clipping (fp16 only)."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer, skip: torch.Tensor | None = None) -> None:
        """Apply the update, reading nothing back. fp16: the scaler skips a step whose gradients
        overflowed (fused AdamW takes its verdict on the device). Otherwise `skip` (a 0-dim tensor on the
        device, engine/guard.py; 1.0: leave the weights and the optimizer state as they are) goes to fused
        AdamW as its found_inf; an optimizer without a fused kernel makes the host read it."""
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        elif skip is None:
            optimizer.step()
        elif optimizer.defaults.get("fused"):
            optimizer.found_inf = skip
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        elif not skip:  # no kernel to hand the flag to: one read a step, where fused AdamW is not offered
            optimizer.step()
