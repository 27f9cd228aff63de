"""Non-finite steps, flagged on the device and read back only where the loop reads anyway.

A check like `if not torch.isfinite(norm)` after every step makes the host wait for the device to
finish the step before it can queue the next one. Instead each step's verdict stays on the device:

- fp32 / bf16 (`stops`): a step whose global gradient norm is not finite, and every step after it,
  leaves the weights and the optimizer state as they are (the optimizer gets the flag as fused AdamW's
  `found_inf`, engine/precision.py). The next read (a logged step, an eval, a checkpoint, the end)
  stops the run naming the first such step: the weights are those of the step before it.
- fp16: the loss scaler skips such steps itself (an overflow is routine there) and the run goes on;
  they are counted, and the count joins `LoopState.skipped_steps` at each read.

The norm is global (every rank's gradients), so every rank flags the same steps.
"""
from __future__ import annotations

import torch


class StepGuard:
    def __init__(self, stops: bool):
        self.stops = stops
        # [non-finite steps since the last read, the first of them (0: none), its gradient norm], on the
        # norm's device (FSDP's CPU offload computes it on the host), made at the first step
        self.books: torch.Tensor | None = None

    def flag(self, norm: torch.Tensor, step: int) -> torch.Tensor | None:
        """Record step `step`'s gradient norm; returns what the optimizer skips on (1.0: leave the
        weights and its state as they are), or None where the loss scaler decides (fp16)."""
        if self.books is None:
            self.books = torch.zeros(3, dtype=torch.float64, device=norm.device)
        bad = (~torch.isfinite(norm)).double()
        if not self.stops:
            self.books[0] += bad
            return None
        first = bad * (self.books[0] == 0)  # 1 on the first non-finite step only
        self.books[1] += first * step
        self.books[2] = torch.where(first > 0, norm.double(), self.books[2])
        self.books[0] += bad
        return (self.books[0] > 0).float()  # sticky: nothing updates after a bad step until the run stops

    def read(self) -> tuple[int, int, float]:
        """(non-finite steps since the last read, the first of them, its norm): one read of the device.
        fp16's count starts again from 0 (the caller keeps the total)."""
        if self.books is None:  # no step yet
            return 0, 0, float("nan")
        count, first, norm = self.books.tolist()
        if not self.stops:
            self.books.zero_()
        return int(count), int(first), norm
