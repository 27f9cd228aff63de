"""What the CPU is, read from /proc without importing torch: the engine's precision probe keys its
cache on it, and the benchmark harness records it beside every figure."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CpuInfo:
    model: str | None = None  # the first processor's `model name` (Arm kernels often give none)
    flags: list[str] = field(default_factory=list)  # x86 `flags`, Arm `Features`
    sockets: int | None = None  # distinct `physical id`s, where the kernel says


def read_cpuinfo(path: str = "/proc/cpuinfo") -> CpuInfo:
    """One pass over /proc/cpuinfo; an empty CpuInfo where there is no such file (not Linux)."""
    model, flags, sockets = None, [], set()
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name == "model name" and model is None:
                    model = value.strip()
                elif name in ("flags", "Features") and not flags:
                    flags = value.split()
                elif name == "physical id":
                    sockets.add(value.strip())
    except OSError:
        pass
    return CpuInfo(model, flags, len(sockets) or None)
