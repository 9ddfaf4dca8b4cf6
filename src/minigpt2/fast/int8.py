"""Int8 weights for decoding: each generated character reads a quarter of the bytes.

Generating one character at batch 1 runs every linear layer as a matrix-vector product, and on a
CPU that product waits on memory: it reads each fp32 weight once and does one multiply-add with it.
Stored as int8 (one byte, and one scale per output row), the weights take a quarter of the
bytes, and PyTorch's weight-only int8 kernel (``aten._weight_int8pack_mm``, bf16 activations,
fp32 sums) multiplies by them without making an fp32 copy. Measured (``python
benchmarks/int8_speed.py``, AMD EPYC, 2 threads, 2026-12-01): one ``shakespeare`` stream 195
characters/s in fp32 against 721 in int8 (3.7x), a batched step of one row 3.86 ms against 1.00.

The numbers change: each weight becomes ``scale[row] * q`` with q an integer in -127 .. 127 and
``scale[row] = max |w[row, :]| / 127`` (symmetric, per output row, as in LLM.int8 and gpt-fast's
int8 mode), and the activations entering each product are rounded to bf16. The cost in loss is
measured by ``benchmarks/decode_weights.py`` and stated in docs/performance.md. Only the four linear
layers of each block are stored this way; embeddings, layer norms, biases, attention over the
cache and the output head (65-110 rows for a character vocabulary) stay as trained.

``Int8Linear`` and ``DenseLinear`` are the two ways ``Decoder`` runs a linear layer;
``choose_decode_weights`` resolves the ``--decode-weights`` setting. Tests: ``pytest
tests/fast/test_int8.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from minigpt2.core.model import GPT
from minigpt2.errors import ConfigError

DECODE_WEIGHTS = ("auto", "int8", "fp32")

# ``auto`` picks int8 from this size of the blocks' fp32 weights up. Below it the weights stay in
# the CPU's caches between characters, so fewer bytes save little and the kernel's casts cost.
# ``python benchmarks/int8_speed.py`` (AMD EPYC, 32 MiB L3, 2 threads, 2026-12-01), int8 against
# fp32 for one stream / batched steps of 1, 5 and 20 rows: ``tiny`` (0.1 MiB) 0.69x / 0.76x, 0.79x,
# 0.58x; ``cpu`` (6.8 MiB) 1.14x / 1.34x, 1.42x, 1.16x; ``chat`` (12 MiB) 2.5x / 2.5x, 1.9x, 1.27x;
# ``shakespeare`` (41 MiB) 3.7x / 3.8x, 2.8x, 1.25x.
AUTO_MIN_BYTES = 4 * 2**20

# The kernel reads the inner dimension 16 values at a time and has no tail: other sizes gave wrong
# sums (8, 24) or crashed (33) when tried, so they are refused (``tests/fast/test_int8.py`` checks that).
_INNER_MULTIPLE = 16


def quantize(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``weight`` (out, in) -> (q, scale): q int8 (out, in), scale bf16 (out,), q * scale ~ weight."""
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,): the row's largest |w| -> 127
    scale = scale.to(torch.bfloat16)  # the kernel's dtype; q is rounded with the rounded scale
    q = torch.round(weight / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class Int8Linear:
    """``F.linear(x, weight, bias)`` with ``weight`` stored as int8 rows and their scales.

    Call with x (B, in) in any float dtype; returns (B, out) in fp32 (bias fp32 + bf16 product)."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        self.q, self.scale = quantize(weight.detach().float())
        self.bias = bias.detach().float()

    def __call__(self, x: Tensor) -> Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scale)  # (B, out)
        return torch.add(self.bias, y)  # fp32, by type promotion

    def dequantized(self) -> Tensor:
        """The weight (out, in) in fp32 as this layer multiplies by it."""
        return self.q.float() * self.scale.float()[:, None]


class DenseLinear:
    """``F.linear(x, weight, bias)`` over the weights as trained (shared, not copied).

    ``torch.addmm(bias, x, weight.t())`` is what ``F.linear`` runs, without the transpose and
    dispatch at each call (~5% of a step)."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        self.weight_t, self.bias = weight.detach().t(), bias.detach()  # (in, out): a view

    def __call__(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x, self.weight_t)


@dataclass(frozen=True)
class DecodeWeights:
    """What ``--decode-weights`` resolved to for a model: "int8" or "fp32", and why."""

    name: str
    reason: str


def choose_decode_weights(model: GPT, spec: str = "auto") -> DecodeWeights:
    """Resolve ``spec`` (auto, int8, fp32) for ``model`` where it is now; refuse what cannot run.

    auto: int8 on a CPU for blocks of ``AUTO_MIN_BYTES`` or more, fp32 otherwise (GPUs read their
    memory fast enough that a batch-1 step is bound by launching kernels, not by bytes)."""
    if spec not in DECODE_WEIGHTS:
        raise ConfigError(f"decode weights must be auto, int8 or fp32, got {spec!r}")
    if spec == "fp32":
        return DecodeWeights("fp32", "--decode-weights fp32: the weights as trained")
    problem = _int8_problem(model)
    if spec == "int8":
        if problem:
            raise ConfigError(f"--decode-weights int8 cannot run here: {problem}; use fp32")
        return DecodeWeights("int8", "--decode-weights int8")
    if problem:
        return DecodeWeights("fp32", f"auto: fp32, as {problem}")
    size = 4 * sum(p.numel() for p in model.transformer.h.parameters())
    if size < AUTO_MIN_BYTES:
        return DecodeWeights(
            "fp32", f"auto: fp32, {size / 2**20:.1f} MiB of weights stay in the CPU's caches"
        )
    return DecodeWeights("int8", f"auto: int8, a quarter of the {size / 2**20:.0f} MiB a character reads")


def _int8_problem(model: GPT) -> str:
    """Why int8 decoding cannot run for ``model``, or "" when it can."""
    if model.device.type != "cpu":
        return f"int8 decoding weights are for CPUs, and the model is on {model.device.type}"
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return "this PyTorch has no int8 weight kernel"
    if model.config.n_embd % _INNER_MULTIPLE:
        return f"the width ({model.config.n_embd}) is not a multiple of {_INNER_MULTIPLE}"
    return ""


Linear = DenseLinear | Int8Linear
