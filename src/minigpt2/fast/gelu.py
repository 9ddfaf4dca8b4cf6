"""GPT-2's tanh GELU compiled into one loop for CPU training: the drop-in for ``nn.GELU("tanh")``,
and for the ``MLP`` around it, whose first layer's bias is added in the same loop.

PyTorch's CPU tanh (accurate to 1 ulp, and slow) makes its tanh GELU about 4x slower than its erf
GELU; forward and backward were 14-18% of a bf16 CPU training step. Since 1 + tanh(z) = 2 sigmoid(2z),
GPT-2's GELU 0.5 x (1 + tanh(z)), z = sqrt(2/pi) (x + 0.044715 x^3), is also x * sigmoid(2z):
``gelu_tanh_via_sigmoid`` computes that in fp32, and ``torch.compile`` turns it into one loop for the
forward and one for the backward (~2x faster together; the ``cpu`` preset's whole step 5-6% faster in
bf16, 16% in fp32), after ~8 s of compiling once per machine (the compiled code is cached on disk).

Its bf16 results equal ``F.gelu``'s above x = -2.9 and are within bf16 rounding of the exact GELU
everywhere; below -2.9, where GELU is under 0.006 in size, ``F.gelu``'s ``1 + tanh(z)`` loses digits
to cancellation (in bf16, up to all of them). In fp32 both agree to fp32 rounding. If compiling fails
(no C++ compiler), it warns once and uses ``F.gelu``.

``CompiledGELUMLP`` hands the loop the bias of ``c_fc`` too: ``addmm`` would copy the bias into its
(B, T, 4C) output before the product and sum the bias gradient over that output in a pass of its
own; in the loop both ride on passes the GELU makes anyway (the ``cpu`` preset's MLP, forward +
backward in fp32: 1.04x on an AVX-512 CPU, 1.01x restricted to AVX2; ``benchmarks/train_pieces.py``).
Tests: ``pytest tests/fast/test_gelu.py``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigpt2.core.model import MLP

log = logging.getLogger(__name__)

_GELU_A = 2.0 * math.sqrt(2.0 / math.pi)  # x * sigmoid(x (A + B x^2)) is GPT-2's GELU
_GELU_B = _GELU_A * 0.044715


def gelu_tanh_via_sigmoid(x: Tensor, bias: Tensor | None = None) -> Tensor:
    """GPT-2's tanh GELU of ``x`` (+ ``bias``) written as ``x * sigmoid(2z)``: the same function,
    computed in fp32 and rounded once to ``x``'s dtype. x: (*, n), bias: (n,); shape-preserving."""
    xf = x.float() if bias is None else x.float() + bias.float()
    return (xf * torch.sigmoid(xf * (_GELU_A + _GELU_B * xf * xf))).to(x.dtype)


# Variables that restrict the instruction set PyTorch uses (``machine.ISA_VARIABLES``).
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


@functools.cache
def _compiled_gelu() -> Callable[[Tensor, Tensor | None], Tensor]:
    # Built on first use: torch.compile imports its compiler stack (seconds), which only training
    # on a CPU needs. dynamic=True: one kernel for every batch and pass shape.
    if any(os.environ.get(name) for name in ISA_VARIABLES):
        # PyTorch's compile caches do not key on these variables: the C++ generated under a
        # restricted set (8 floats a vector for AVX2) would be found by a later unrestricted
        # process on the same machine and compiled for AVX-512 (16 a vector), writing past its
        # buffers (seen: "free(): invalid pointer"). A restricted process keeps out of them.
        from torch._functorch import config as functorch_config
        from torch._inductor import config as inductor_config

        inductor_config.fx_graph_cache = False
        functorch_config.enable_autograd_cache = False
    return torch.compile(gelu_tanh_via_sigmoid, dynamic=True)


class CompiledGELU(nn.GELU):
    """``nn.GELU(approximate="tanh")``; in CPU training on large tensors, the compiled loop."""

    # A compiled call costs ~0.1-0.2 ms more than an eager one (guards, autograd wrapper), which
    # the faster loop earns back only on large tensors: in fp32, 0.15 ms (F.gelu) against 0.21 ms
    # (compiled) forward + backward at 32K elements (the `tiny` preset), 7 ms against 3.5 ms at
    # 2.4M (24 x 128 x 768: the `cpu` preset's shape with batch 24). Break-even is near 120K elements.
    COMPILED_MIN_NUMEL = 1 << 18

    broken = False  # set for the whole process once compiling has failed

    def __init__(self) -> None:
        super().__init__(approximate="tanh")

    def takes_compiled_loop(self, device: torch.device, numel: int) -> bool:
        """Whether a GELU of ``numel`` elements on ``device`` runs the compiled loop."""
        return (
            not CompiledGELU.broken
            and device.type == "cpu"
            and numel >= CompiledGELU.COMPILED_MIN_NUMEL
            and self.training
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()  # a compiled model fuses F.gelu itself
        )

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """GELU(x + bias), x: (*, n), bias: (n,) or None; shape-preserving."""
        if self.takes_compiled_loop(x.device, x.numel()):
            try:
                return _compiled_gelu()(x, bias)
            except Exception as err:  # no compiler, an unsupported platform: stay correct, go slower
                CompiledGELU.broken = True
                log.warning(
                    "the compiled GELU failed (%s); training goes on with F.gelu (slower)",
                    (str(err).splitlines() or [type(err).__name__])[0][:200],
                )
        return super().forward(x if bias is None else x + bias.to(x.dtype))


class CompiledGELUMLP(MLP):
    """``MLP`` whose ``c_fc`` bias is added in the compiled GELU's loop when its GELU runs that loop
    (``c_fc``'s weight is used directly then: hooks on ``c_fc`` do not fire in CPU training)."""

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        hidden = x.shape[:-1].numel() * self.c_fc.out_features  # the GELU's elements
        if isinstance(self.act, CompiledGELU) and self.act.takes_compiled_loop(x.device, hidden):
            h = F.linear(x, self.c_fc.weight)  # (B, T, 4C), without the bias
            return self.dropout(self.c_proj(self.act(h, self.c_fc.bias)))
        return super().forward(x)
