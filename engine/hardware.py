"""What the CPU is, read from /proc without importing torch: the engine's precision probe keys its
cache on it, and the benchmark harness records it beside every figure."""
from __future__ import annotations


def cpu_model_and_flags(path: str = "/proc/cpuinfo") -> tuple[str | None, list[str]]:
    """The CPU's model name and feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`);
    (None, []) where there is no such file. The harness's hardware block reads the same."""
    model, flags = None, []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name == "model name" and model is None:
                    model = value.strip()
                elif name in ("flags", "Features") and not flags:
                    flags = value.split()
    except OSError:  # not Linux
        pass
    return model, flags
