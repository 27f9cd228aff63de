"""SIGTERM / SIGINT: finish the step in flight, checkpoint, then stop (instead of dying mid-step);
after training, stop at once (the last checkpoint holds all the training).

Schedulers (Slurm, Kubernetes, torchrun itself) send SIGTERM before they kill; a run that saves
on it loses nothing. Ranks agree before stopping, so they all save the same step.
"""
from __future__ import annotations

import contextlib
import signal
import threading

import torch

from engine.errors import StopTraining


class StopRequest:
    def __init__(self, dist):
        self.dist = dist
        self.signal: int | None = None

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    @contextlib.contextmanager
    def _handlers(self, handler):
        if threading.current_thread() is not threading.main_thread():
            yield self  # handlers can only be set from the main thread
            return
        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, old in previous.items():
                signal.signal(s, old)

    def installed(self):
        """During training: a signal is noted; the loop asks `requested()` after each step."""
        return self._handlers(self._handle)

    @contextlib.contextmanager
    def at_once(self, when: str):
        """After training (the final scoring and exports): a signal stops the run where it is, as a
        StopTraining naming `when`. Whatever the signal breaks on the way (a collective whose peer
        already stopped, a model load) ends as the same stop, not as a traceback."""
        def stop(signum, frame):
            self.signal = signum
            raise StopTraining(f"stopped by a signal {when}")

        with self._handlers(stop):
            try:
                yield self
            except BaseException as e:
                if self.signal is None or isinstance(e, StopTraining):
                    raise
                raise StopTraining(f"stopped by a signal {when}") from None

    def requested(self) -> bool:
        """True on every rank once any rank was signalled (one small all-reduce per step)."""
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=self.dist.device)
        return bool(self.dist.all_reduce_sum(flag).item() > 0)
