"""Attention tuned for CPU training: the drop-in for ``CausalSelfAttention``.

On a CPU the attention's time goes less to its matrix products than to moving the (B, nh, T, Tk)
scores and the per-head copies of q, k, v through memory. In CPU training, ``forward`` runs the
attention from the fused q, k, v (B, T, 3C) to the heads' re-assembled output (B, T, C) as one
autograd node, ``CausalAttention``, whose backward is written out: PyTorch's autograd would split
the same function into a dozen nodes (the heads' split and transposes, the slices, their
zero-filled gradients and the sums of them), each a pass over memory. The node

- copies each of q, k, v once into the (B*nh, T, hs) layout the batched products read, q scaled
  by 1/sqrt(hs) in the same pass (a tensor Tk/hs times smaller than the scores);
- adds the causal mask as a 0 / -inf bias inside the product (``baddbmm``), where a bool
  ``masked_fill`` costs a pass of its own forward and backward;
- keeps the softmax in the scores' own dtype (under autocast, bf16: its kernels sum in fp32 and
  round once, where the fp32 softmax autocast would pick costs two extra copies of the scores);
- applies attention dropout as a 0/1 mask on the probabilities and one 1 / (1 - p) scaling of the
  (B, T, C) output, a tensor T/hs times smaller than the probabilities it would otherwise scale;
- from a context of ``SPLIT_FROM`` on, cuts the queries in two halves: the first half's queries
  see only the first half's keys, so their scores against the second half, all masked, are never
  computed: only 3/4 of the scores, softmax and products are, forward and backward;
- writes the output and the (B, T, 3C) gradient straight into their final layouts, and adds the
  first half's k and v gradients into the slices of the second half's.

Hooks on ``c_attn`` still fire; ``attn_dropout`` is not called (the node draws its mask with
``dropout.keep_mask``, as the engine's dropout does). Everywhere else (inference, GPUs, a
compiled model, which fuses the textbook itself) it is the textbook's attention. The ``cpu``
preset's attention, forward + backward in fp32 (``benchmarks/train_pieces.py``): 1.2x the
written-out textbook; against its SDPA, 1.05x restricted to AVX2, on par on AVX-512 and 1.0-1.16x
on an AVX2-only AMD EPYC. With dropout, 1.06-1.12x the same arithmetic in autograd's graph.
Tests: ``pytest tests/fast/test_attention.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from minigpt2.core.model import CausalSelfAttention, KVCache, causal_mask
from minigpt2.fast.dropout import keep_mask

# The context from which the queries are cut in two (above). The attention's forward + backward
# in fp32 on 6,144 tokens, restricted to AVX2: 1.3-1.4x faster at T = 256, 1.0-1.1x at 128 (the
# `cpu` preset's whole step 1.01-1.02x), slower at 64.
SPLIT_FROM = 128


def causal_bias(T: int, Tk: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(T, Tk): 0 where a query may look (``causal_mask``), -inf where it may not."""
    return torch.zeros(T, Tk, dtype=dtype, device=device).masked_fill(~causal_mask(T, Tk, device), -math.inf)


def query_parts(T: int) -> list[tuple[int, int]]:
    """The queries [s, e) attended together, each against keys [0, e): all T below ``SPLIT_FROM``,
    else the two halves, the one that sees every key first."""
    if T < SPLIT_FROM:
        return [(0, T)]
    return [(T // 2, T), (0, T // 2)]


def heads_view(x: Tensor, n_head: int) -> Tensor:
    """(B, T, C), rows of any stride -> its (B, nh, T, hs) view."""
    return torch.unflatten(x, 2, (n_head, x.size(2) // n_head)).transpose(1, 2)


class CausalAttention(torch.autograd.Function):
    """The heads' causal attention, (B, T, 3C) fused q, k, v -> (B, T, C), as one autograd node."""

    @staticmethod
    def forward(ctx: Any, qkv: Tensor, n_head: int, dropout: float = 0.0) -> Tensor:
        """qkv (B, T, 3C) -> y (B, T, C), with attention dropout p = ``dropout``; saves q (scaled),
        k, v (B*nh, T, hs), each part's probabilities (B*nh, e - s, e) and, with dropout, their
        0/1 masks and the kept probabilities (what autograd would save: recomputing the product
        in the backward costs more time than it saves memory)."""
        B, T, C = qkv.size(0), qkv.size(1), qkv.size(2) // 3
        N, hs = B * n_head, C // n_head
        q, k, v = (torch.empty(B, n_head, T, hs, dtype=qkv.dtype, device=qkv.device) for _ in range(3))
        # (B, nh, T, hs) views of qkv's three C-wide column blocks.
        slot_q, slot_k, slot_v = (heads_view(t, n_head) for t in torch.split(qkv, C, dim=2))
        torch.mul(slot_q, 1.0 / math.sqrt(hs), out=q)
        k.copy_(slot_k)
        v.copy_(slot_v)
        q, k, v = q.view(N, T, hs), k.view(N, T, hs), v.view(N, T, hs)
        y = torch.empty(B, T, C, dtype=qkv.dtype, device=qkv.device)
        y_heads = heads_view(y, n_head)  # (B, nh, T, hs): each part's output lands in y through it
        probs, masks, kept = [], [], []
        for s, e in query_parts(T):
            scores = torch.baddbmm(causal_bias(e - s, e, qkv.dtype, qkv.device), q[:, s:e], k[:, :e].mT)
            d = torch.softmax(scores, dim=-1)  # (N, e - s, e): P
            probs.append(d)
            if dropout > 0:
                masks.append(keep_mask(d.shape, dropout, d.dtype))
                d = d * masks[-1]  # D = P * M
                kept.append(d)
            y_heads[:, :, s:e] = (d @ v[:, :e]).view(B, n_head, e - s, hs)
        if dropout > 0:
            y.mul_(1.0 / (1.0 - dropout))  # dropout's scaling of the kept probabilities, done here
        ctx.save_for_backward(q, k, v, *probs, *masks, *kept)
        ctx.n_head, ctx.dropout = n_head, dropout
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, None, None]:
        """dy (B, T, C) -> d qkv (B, T, 3C). Per part, with q~ = q / sqrt(hs), S = q~ k^T + mask,
        P = softmax(S), D = P * M (M the 0/1 dropout mask; D = P without dropout), and with
        dY' = dY / (1 - p): Y = D V / (1 - p), dV = D^T dY', dP = (dY' V^T) * M,
        dS = P (dP - rowsum(dP P)), dq = dS k / sqrt(hs), dk = dS^T q~; the first half's dk, dV
        add into the full ones."""
        q, k, v, *saved = ctx.saved_tensors
        (N, T, hs), n_head, dropout = q.shape, ctx.n_head, ctx.dropout
        parts = query_parts(T)
        n = len(parts)  # saved: n probabilities P, then with dropout n masks M and n kept D
        probs = saved[:n]
        masks, kept = (saved[n : 2 * n], saved[2 * n :]) if dropout > 0 else ([None] * n, probs)
        dy = heads_view(dy, n_head).reshape(N, T, hs)
        if dropout > 0:
            dy = dy * (1.0 / (1.0 - dropout))  # the scaling, on the (N, T, hs) side of each product
        dqkv = torch.empty(N // n_head, T, 3 * n_head * hs, dtype=q.dtype, device=q.device)
        slot_q, slot_k, slot_v = (heads_view(t, n_head) for t in torch.split(dqkv, n_head * hs, dim=2))
        dk: Tensor | None = None
        dv: Tensor | None = None
        for (s, e), p, mask, d in zip(parts, probs, masks, kept, strict=True):
            dp = dy[:, s:e] @ v[:, :e].mT
            if mask is not None:
                dp.mul_(mask)
            # dS = p (dp - rowsum(dp p)) in one kernel: autograd's own softmax backward (a private
            # name; the gradcheck in tests/fast/test_attention.py would catch a change of meaning).
            dscores = torch._softmax_backward_data(dp, p, -1, p.dtype)
            dq = (dscores @ k[:, :e]).mul_(1.0 / math.sqrt(hs))  # q was scaled in the forward
            slot_q[:, :, s:e] = dq.view(-1, n_head, e - s, hs)
            if dk is None or dv is None:  # the first part, which sees every key, starts them
                dk, dv = dscores.mT @ q[:, s:e], d.mT @ dy[:, s:e]
            else:  # (an in-place baddbmm_ into these slices falls back to one product per matrix)
                dk[:, :e] += dscores.mT @ q[:, s:e]
                dv[:, :e] += d.mT @ dy[:, s:e]
        assert dk is not None and dv is not None
        slot_k.copy_(dk.view_as(slot_k))
        slot_v.copy_(dv.view_as(slot_v))
        return dqkv, None, None


def _cpu_training(x: Tensor, training: bool) -> bool:
    """Whether a module in ``training`` mode, given ``x``, is in CPU training outside a compile."""
    on_cpu = x.device.type == "cpu"
    return on_cpu and training and torch.is_grad_enabled() and not torch.compiler.is_compiling()


class CPUTrainingAttention(CausalSelfAttention):
    """``CausalSelfAttention`` whose CPU training runs ``CausalAttention`` (above)."""

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        if cache is None and _cpu_training(x, self.training):
            qkv = self.c_attn(x)  # (B, T, 3C), in the dtype autocast chose: the attention keeps it
            with torch.autocast("cpu", enabled=False):
                y = CausalAttention.apply(qkv, self.n_head, self.dropout)  # type: ignore[no-untyped-call]
            return self.resid_dropout(self.c_proj(y))
        return super().forward(x, cache, layer)
