"""Device and precision choice, shared by training and inference (``Precision`` itself, the autocast
region and the loss scaler, is the textbook's: ``core/precision.py``).

``--dtype auto`` picks, in this order: bf16 on CUDA GPUs that support it; fp16 with a ``GradScaler``
on older CUDA GPUs; on a CPU, bf16 autocast where it is measured to be faster for the run's shapes
(``machine.cpu_autocast_pays``: AMX and AVX512-BF16 CPUs, not those where PyTorch emulates bf16,
whatever the CPU's flags say once the instruction set is restricted); fp32 elsewhere, MPS included
(autocast there is not reliable across PyTorch versions). fp16 is only ever used with a scaler: its
narrow range underflows small gradients to zero without one.
"""

from __future__ import annotations

import torch

from minigpt2.core.precision import DTYPES, Precision
from minigpt2.errors import ConfigError

__all__ = ["DTYPES", "Precision", "choose_device", "choose_precision"]


def choose_device(spec: str = "auto") -> torch.device:
    """``auto`` is the first of CUDA, MPS, CPU that is present; anything else is checked."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but no CUDA GPU is available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device mps was asked for, but MPS is not available")
    return device


# bf16 autocast casts every weight and activation it touches; with too little matrix work per
# forward pass (tokens x width^2) the casts cost more than bf16 saves. Measured on a 2-core CPU:
# width 32 x 4,096 tokens (4M): even; the tiny preset (width 32 x 256 tokens): bf16 0.5x; width 64 x
# 4,096 tokens (17M): bf16 1.6x.
CPU_BF16_MIN_WORK = 8_000_000


def choose_precision(
    device: torch.device,
    dtype: str = "auto",
    inference: bool = False,
    work: int | None = None,
    shape: tuple[int, int] | None = None,
) -> Precision:
    """Resolve ``--dtype`` (auto, bf16, fp16, fp32) for ``device``; refuse combinations that fail.

    With ``inference`` (one sequence, one character at a time), ``auto`` on a CPU stays in fp32:
    the matrices are too small to gain from bf16, and autocast's casts on every call cost more than
    they save (measured by benchmarks/generation.py). On GPUs it is the same choice as training.
    ``work`` (tokens per forward pass x width squared) does the same for tiny training runs; above
    it, ``shape`` (tokens per pass, width) is what a CPU's bf16 is measured on.
    """
    if dtype not in ("auto", *DTYPES):
        raise ConfigError(f"dtype must be auto, bf16, fp16 or fp32, got {dtype!r}")
    kind = device.type
    if dtype == "auto":
        if kind == "cuda":
            if torch.cuda.is_bf16_supported():
                return Precision(device, "bf16", "auto: this CUDA GPU supports bf16")
            return Precision(device, "fp16", "auto: CUDA GPU without bf16, fp16 with a GradScaler")
        if kind == "cpu" and inference:
            return Precision(device, "fp32", "auto: fp32 is fastest for one-sequence generation on a CPU")
        if kind == "cpu" and work is not None and work < CPU_BF16_MIN_WORK:
            return Precision(device, "fp32", "auto: too little work per pass for bf16 to pay on a CPU")
        if kind == "cpu":
            from minigpt2.hardware.machine import cpu_autocast_pays

            tokens, width = shape if shape is not None else (4096, 256)
            if cpu_autocast_pays(tokens, width):
                return Precision(device, "bf16", "auto: bf16 autocast measured faster on this CPU")
            return Precision(device, "fp32", "auto: bf16 measured no faster than fp32 on this CPU")
        return Precision(device, "fp32", f"auto: no fast mixed precision on {kind}")
    if dtype != "fp32" and kind == "mps":
        raise ConfigError("autocast on MPS is not supported here; use --dtype fp32 (or auto)")
    if dtype == "fp16" and kind == "cpu":
        raise ConfigError("fp16 autocast is for CUDA GPUs; on CPU use --dtype bf16 or fp32")
    return Precision(device, dtype, f"--dtype {dtype}")
