"""Counting device-to-host reads per training step: every way Python code turns a tensor into a host
value (item, tolist, cpu, numpy, bool, float, int, index, NumPy's array protocol, torch.equal /
allclose / is_nonzero). Used in-process (tests/test_step_reads.py) and under torchrun
(tests/distributed/count_reads.py).

A step's window runs from the entry of engine.loop.train_step to the entry of the next one, so the
bookkeeping after a step (logging, evals, checkpoints) counts for that step. Only the main thread
counts: the batches built ahead on the prefetch thread are the host's own arrays.

Each read is recorded with the innermost frame outside torch's tensor class, "path:line". One read
is not the engine's: transformers' mask helper asks `padding_mask.all()` on every forward of a
padded batch (masking_utils, to skip the mask when nothing is padded); the engine cannot remove it
from outside, and torch.compile traces it away. `engine_reads` leaves it out and names the rest.
"""
from __future__ import annotations

import contextlib
import inspect
import sys
import threading

import torch

METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__array__")
FUNCTIONS = ("equal", "allclose", "is_nonzero")
MODEL_OWN = "transformers/masking_utils.py"  # the mask check described above
HERE = __file__


class ReadCounter:
    def __init__(self):
        self.step: int | None = None  # the step whose window is open (None: before the first)
        self.reads: dict[int, list[str]] = {}
        self.main = threading.get_ident()
        self.depth = threading.local()  # a read inside a read (numpy() under __array__) counts once

    def record(self, name: str) -> None:
        if self.step is None or threading.get_ident() != self.main:
            return
        frame = sys._getframe(2)
        while frame and (frame.f_code.co_filename == HERE or frame.f_code.co_filename.endswith("torch/_tensor.py")):
            frame = frame.f_back
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame else "?"
        self.reads.setdefault(self.step, []).append(f"{name} at {where}")

    def _wrap(self, name: str, real):
        counter = self

        def read(*args, **kwargs):
            depth = getattr(counter.depth, "n", 0)
            if depth == 0:
                counter.record(name)
            counter.depth.n = depth + 1
            try:
                return real(*args, **kwargs)
            finally:
                counter.depth.n = depth
        return read

    @contextlib.contextmanager
    def installed(self):
        """Patch every read, and engine.loop.train_step to open each step's window."""
        from engine import loop

        saved = [(torch.Tensor, name, torch.Tensor.__dict__.get(name)) for name in METHODS]
        saved += [(torch, name, getattr(torch, name)) for name in FUNCTIONS]
        saved.append((loop, "train_step", loop.train_step))
        for owner, name, _ in saved[:-1]:
            setattr(owner, name, self._wrap(name, getattr(owner, name)))
        real_step = loop.train_step
        signature = inspect.signature(real_step)

        def train_step(*args, **kwargs):
            self.step = signature.bind(*args, **kwargs).arguments["state"].step + 1  # the step about to be taken
            return real_step(*args, **kwargs)

        loop.train_step = train_step
        try:
            yield self
        finally:
            for owner, name, real in saved:
                if real is None:  # inherited (from torch._C.TensorBase): drop the patch
                    delattr(owner, name)
                else:
                    setattr(owner, name, real)


def engine_reads(reads: dict, steps) -> dict[int, list[str]]:
    """The reads of `steps` other than transformers' own mask check, by step."""
    out = {}
    for step in steps:
        mine = [r for r in reads.get(step, reads.get(str(step), [])) if MODEL_OWN not in r]
        if mine:
            out[step] = mine
    return out
