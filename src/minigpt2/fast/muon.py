"""Muon's orthogonalization with fewer FLOPs: the drop-in for ``core.muon.Muon.orthogonalize``.

The textbook iterates on the update itself: five times ``x <- (a I + b A + c A^2) x`` with
``A = x x^T``, two products of (m, m) by (m, n) each time (m <= n). Every iterate is a polynomial in
the first Gram matrix ``R = x0 x0^T`` applied to ``x0``: ``x_k = Q_k x0``. So the iteration can run
on (m, m) matrices alone: ``P = a I + b A + c A^2``, ``Q <- P Q``, ``A <- P A P`` (the next
``x x^T``), and touch the (m, n) update twice, for ``R`` and for ``Q x0`` at the end. The same
function, in exact arithmetic, for ``2 m^3 (4 steps - 3) + 4 m^2 n`` FLOPs instead of
``steps (4 m^2 n + 2 m^3)``: fewer once n > 1.5 m. For the blocks of a GPT-2 of width C that is the
attention's ``c_attn`` (n = 3m: 66% of the textbook's FLOPs) and the MLP's two matrices (n = 4m: 56%);
square matrices keep the textbook's iteration.

In fp32 it agrees with the textbook to 2e-4 to 1e-3 of the largest entry (the more spread out the
singular values, the more rounding the Gram matrices' products amplify), where the textbook itself is
within 3e-5 of an fp64 reference and its bf16 iteration within 6e-2 at best. In bf16 the Gram
iteration fails (singular values of 3 to 6 come out where the textbook gives ~1), so where Muon runs
its products in bf16 (a GPU, a CPU with bf16 units) this is the textbook's iteration, as it is on a
square matrix. It is what Muon runs where fp32 is the fastest arithmetic (an AVX2 laptop CPU): there
the ``cpu`` preset's optimizer step went from ~9% of a training step to ~6%
(``benchmarks/train_throughput.py``, docs/performance.md section 2).
Tests: ``pytest tests/fast/test_muon.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from minigpt2.core.muon import NS_COEFFICIENTS, Muon

# The Gram iteration pays once n > 1.5 m (the module's docstring); a margin keeps the textbook's
# where the two are near (and where the FLOP count is not the whole cost).
GRAM_MIN_RATIO = 2.0


def gram_orthogonalize(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """(N, m, n) -> (N, m, n) in fp32: ``core.muon.orthogonalize`` in fp32, iterated on Gram matrices."""
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:  # work with the smaller Gram matrix, (m, m) with m <= n
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)  # singular values into (0, 1]
    gram = x @ x.mT  # (N, m, m): x_k x_k^T, here for k = 0
    q: Tensor | None = None  # x_k = q x, built one polynomial at a time
    for k in range(steps):
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        poly.diagonal(dim1=-2, dim2=-1).add_(a)  # + a I
        q = poly if q is None else poly @ q
        if k < steps - 1:
            gram = poly @ gram @ poly  # x_{k+1} x_{k+1}^T = P x_k x_k^T P (P is symmetric)
    out = x if q is None else q @ x  # (N, m, n)
    return out.mT if tall else out


class GramMuon(Muon):
    """``Muon`` whose fp32 orthogonalization of matrices wider than ``GRAM_MIN_RATIO`` iterates on
    their Gram matrices; every other case is the textbook's."""

    def orthogonalize(self, stack: Tensor, steps: int) -> Tensor:
        m, n = sorted(stack.shape[-2:])
        if self.ns_dtype == torch.float32 and n >= GRAM_MIN_RATIO * m:
            return gram_orthogonalize(stack, steps)
        return super().orthogonalize(stack, steps)
