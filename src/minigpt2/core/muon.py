"""Muon, the optimizer ``--optimizer muon`` gives the blocks' weight matrices (AdamW keeps the rest).

AdamW (``core/optim.py``) scales each weight's step by that weight's own gradient history. Muon
(Keller Jordan et al., 2024) treats a weight matrix as one object: it keeps a momentum of the
matrix's gradient, then *orthogonalizes* it, replacing the singular values of ``U S V^T`` by ones
(approximately, with five Newton-Schulz iterations), so that every direction of the update moves as
far, rare ones as much as the common ones that dominate the gradient. Per step of training it learns
more, though each step costs a few more matrix products (the orthogonalization); the measurements
are in ``docs/performance.md``, section 3.

Muon is for 2-D matrices inside the blocks (attention and MLP). The embeddings (also the output
head, as the weights are tied), biases and LayerNorms keep AdamW, as in Muon's own recipe.

Tests: ``pytest tests/core/test_optim.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

# A quintic polynomial per iteration, x -> a x + b (x x^T) x + c (x x^T)^2 x, applied to the singular
# values: these coefficients (Jordan's) push every singular value in (0, 1] to roughly 0.7-1.2 in
# five iterations; exact orthogonality would take more iterations and did not train better.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(
    g: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """(N, m, n) stack of matrices -> (N, m, n) in ``dtype``: each matrix with the same singular
    vectors and its singular values pushed towards 1 by ``steps`` Newton-Schulz iterations."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)  # the iterations tolerate bf16, which runs on the CPU's or GPU's fast units
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix: (m, m) with m <= n; contiguous: 2x faster products
        x = x.mT.contiguous()
    # Dividing by the Frobenius norm (never below the largest singular value) puts every singular
    # value in (0, 1], where the iteration converges.
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT  # (N, m, m)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b gram + c gram^2
        poly.diagonal(dim1=-2, dim2=-1).add_(a)  # + a I: then a x + (b gram + c gram^2) x is one product
        x = poly @ x  # (N, m, n)
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Momentum, orthogonalized: for 2-D parameters only (weight matrices, shape (out, in)).

    Each step: ``buf = momentum * buf + (1 - momentum) * grad``; the update is
    ``orthogonalize(grad + momentum * (buf - grad))`` (Nesterov) or ``orthogonalize(buf)``, scaled
    by ``sqrt(max(1, out / in))`` so that tall matrices move as far per input as square ones; decoupled
    weight decay as in AdamW. Matrices of the same shape (the same layer in every block) are
    orthogonalized together, one batched matrix product per iteration instead of one per matrix.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.float32,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps
        )
        super().__init__(params, defaults)
        # The dtype of the Newton-Schulz products: bf16 where the hardware multiplies in it (a CUDA
        # GPU, a CPU with AMX or AVX512-BF16), fp32 where bf16 would be emulated (``make_optimizer``).
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            if any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon takes 2-D weight matrices only; give the others to AdamW")

    def orthogonalize(self, stack: Tensor, steps: int) -> Tensor:
        """(N, m, n) updates of one shape -> (N, m, n) orthogonalized, in ``ns_dtype``."""
        return orthogonalize(stack, steps, dtype=self.ns_dtype)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            by_shape: dict[torch.Size, list[tuple[Tensor, Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                by_shape.setdefault(p.shape, []).append((p, update))
            for shape, pairs in by_shape.items():
                ortho = self.orthogonalize(torch.stack([u for _, u in pairs]), group["ns_steps"])
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                for (p, _), o in zip(pairs, ortho, strict=True):
                    p.mul_(1 - lr * decay)
                    p.add_(o, alpha=-lr * scale)


class Optimizers:
    """Several optimizers driven as one: what the training loop and ``GradScaler`` use of an
    optimizer (``param_groups``, ``step``, ``zero_grad``, ``state_dict``, ``load_state_dict``)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        # The optimizers' own group dicts: setting a group's "lr" here sets it there.
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("optimizers")
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            raise ValueError("the saved optimizer state is for another optimizer")
        for o, s in zip(self.optimizers, saved, strict=True):
            o.load_state_dict(s)
