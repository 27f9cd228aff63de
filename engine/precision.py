"""Mixed precision: which autocast dtype a step runs under, and the fp16 loss scaler.

Weights and optimizer state stay fp32 (the master copy); autocast runs matmuls in bf16 or fp16.
fp16's narrow range needs a GradScaler that skips steps whose gradients overflowed; bf16 does not.
"""
from __future__ import annotations

import contextlib

import torch

from engine.errors import RecipeError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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

    def step(self, optimizer) -> bool:
        """Apply the update; False when the fp16 scaler skipped it for inf/NaN gradients."""
        if not self.scaler:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= before
