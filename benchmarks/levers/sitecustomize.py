"""Loaded at start-up when this folder is on PYTHONPATH (benchmarks/gpu_full.sh's levers-sync step): with
BENCH_SYNC_EACH_STEP=1 every AdamW step is followed by one device-to-host read, as the engine's step made
before issue 30 (it read `torch.isfinite(grad_norm)` back each step), so that a GPU measures what the
sync-free step gains against the same engine otherwise. Benchmark-only: nothing in engine/ reads it."""
import os

if os.environ.get("BENCH_SYNC_EACH_STEP") == "1":
    import torch

    _step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        out = _step(self, *args, **kwargs)
        self.param_groups[0]["params"][0].detach().reshape(-1)[0].item()  # waits for the step to finish
        return out

    torch.optim.AdamW.step = step
