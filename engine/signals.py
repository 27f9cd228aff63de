"""SIGTERM / SIGINT: finish the step in flight, checkpoint, then stop (instead of dying mid-step).

Schedulers (Slurm, Kubernetes, torchrun itself) send SIGTERM before they kill; a run that saves
on it loses nothing. Ranks agree before stopping, so they all save the same step.
"""
from __future__ import annotations

import contextlib
import signal
import threading

import torch


class StopRequest:
    def __init__(self, dist):
        self.dist = dist
        self.signal: int | None = None

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # handlers can only be set from the main thread
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def requested(self) -> bool:
        """True on every rank once any rank was signalled (one small all-reduce per step)."""
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=self.dist.device)
        return bool(self.dist.all_reduce_sum(flag).item() > 0)
