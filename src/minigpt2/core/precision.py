"""Mixed precision, the first of the five training techniques: what ``--dtype`` resolved to.

A forward pass under ``torch.autocast`` computes its matrix products in a 16-bit dtype (bf16 or
fp16) while the weights, their gradients and the optimizer stay fp32: the products run faster where
the hardware has 16-bit units, and the model learns as in fp32. bf16 keeps fp32's range, so it needs
nothing more; fp16's range is narrow, so small gradients would underflow to zero, and the loss is
multiplied up first (a ``torch.amp.GradScaler``, ``use_scaler``) and the gradients divided back
before the step (``core/train_step.py``). fp32 is no autocast at all. Which one a machine gets is
decided outside the textbook (``minigpt2.hardware.precision.choose_precision``, by measurement on a CPU).
Tests: ``pytest tests/core/test_core_train.py``, ``tests/training/test_train.py -k bf16``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    """What ``--dtype`` resolved to on a device: the autocast dtype and whether to scale the loss."""

    device: torch.device
    name: str  # "bf16", "fp16" or "fp32"
    reason: str  # one line for the log: why this was chosen

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def use_scaler(self) -> bool:
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """The ``torch.autocast`` region for forward passes (a no-op for fp32)."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)
