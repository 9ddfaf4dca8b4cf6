"""Attention tuned for CPU training: the drop-in for ``CausalSelfAttention``.

On a CPU the attention's time goes less to its matrix products than to moving the (B, nh, T, Tk)
scores and the per-head copies of q, k, v through memory. Two paths compute the textbook's function
with less of that.

Both of its paths take three details of the written-out attention: q scaled by 1/sqrt(hs) before
the product (a tensor Tk/hs times smaller than the scores), the mask as an added 0 / -inf bias (a
fraction of a ``masked_fill`` on the CPU, forward and backward), and the softmax in the scores' own
dtype (under autocast, bf16: its kernels sum in fp32 and round once, where the fp32 softmax autocast
would pick costs two extra copies of the scores). And both cut the queries in two halves from a
context of ``SPLIT_FROM`` on: the first half's queries see only the first half's keys, so their
scores against the second half, all masked, are never computed: only 3/4 of the (B, nh, T, T)
scores, softmax and products are, forward and backward.

Without attention dropout (the ``cpu`` preset, and every model ``fit_to_budget`` narrows),
``forward`` runs ``CausalAttention``: one autograd node from the fused q, k, v (B, T, 3C) to the
heads' re-assembled output (B, T, C), whose backward PyTorch's autograd would otherwise split into
a dozen (the heads' split and transposes, the slices of the halves, their zero-filled gradients and
the sums of them). It copies each of q, k, v once into the (B*nh, T, hs) layout the batched
products read (q scaled in the same pass), adds the mask inside the product (``baddbmm``), writes
the output and the (B, T, 3C) gradient straight into their final layouts, and adds the first half's
k and v gradients into the slices of the second half's. With dropout, ``attend`` does the same
arithmetic inside autograd's graph. Hooks on ``c_attn`` still fire; ``attn_dropout`` is not called
by the node (its p is 0).

Everywhere else (inference, GPUs, a compiled model, which fuses the textbook itself) it is the
textbook's attention. The ``cpu`` preset's attention, forward + backward in fp32
(``benchmarks/train_pieces.py``): ``CausalAttention`` 1.05x the ``attend`` path, 1.05x the
textbook's SDPA restricted to AVX2 and on par with it on AVX-512, 1.2x the written-out textbook.
Tests: ``pytest tests/fast/test_attention.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from minigpt2.core.model import CausalSelfAttention, KVCache, causal_mask

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
    def forward(ctx: Any, qkv: Tensor, n_head: int) -> Tensor:
        """qkv (B, T, 3C) -> y (B, T, C); saves q (scaled), k, v (B*nh, T, hs) and each part's
        probabilities (B*nh, e - s, e)."""
        B, T, C = qkv.size(0), qkv.size(1), qkv.size(2) // 3
        N, hs = B * n_head, C // n_head
        q, k, v = (torch.empty(B, n_head, T, hs, dtype=qkv.dtype, device=qkv.device) for _ in range(3))
        # (B, nh, T, hs) views of qkv's three C-wide column blocks.
        slot_q, slot_k, slot_v = (heads_view(t, n_head) for t in torch.split(qkv, C, dim=2))
        # q scaled by 1/sqrt(hs) as it is copied: a tensor Tk/hs times smaller than the scores.
        torch.mul(slot_q, 1.0 / math.sqrt(hs), out=q)
        k.copy_(slot_k)
        v.copy_(slot_v)
        q, k, v = q.view(N, T, hs), k.view(N, T, hs), v.view(N, T, hs)
        y = torch.empty(B, T, C, dtype=qkv.dtype, device=qkv.device)
        y_heads = heads_view(y, n_head)  # (B, nh, T, hs): each part's output lands in y through it
        probs = []
        for s, e in query_parts(T):
            scores = torch.baddbmm(causal_bias(e - s, e, qkv.dtype, qkv.device), q[:, s:e], k[:, :e].mT)
            probs.append(torch.softmax(scores, dim=-1))  # (N, e - s, e)
            y_heads[:, :, s:e] = (probs[-1] @ v[:, :e]).view(B, n_head, e - s, hs)
        ctx.save_for_backward(q, k, v, *probs)
        ctx.n_head = n_head
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, None]:
        """dy (B, T, C) -> d qkv (B, T, 3C). Per part, with q~ = q / sqrt(hs), S = q~ k^T + mask,
        P = softmax(S), Y = P V: dV = P^T dY, dP = dY V^T, dS = P (dP - rowsum(dP P)),
        dq = dS k / sqrt(hs), dk = dS^T q~; the first half's dk, dV add into the full ones."""
        q, k, v, *probs = ctx.saved_tensors
        (N, T, hs), n_head = q.shape, ctx.n_head
        dy = heads_view(dy, n_head).reshape(N, T, hs)
        dqkv = torch.empty(N // n_head, T, 3 * n_head * hs, dtype=q.dtype, device=q.device)
        slot_q, slot_k, slot_v = (heads_view(t, n_head) for t in torch.split(dqkv, n_head * hs, dim=2))
        dk: Tensor | None = None
        dv: Tensor | None = None
        for (s, e), p in zip(query_parts(T), probs, strict=True):
            dp = dy[:, s:e] @ v[:, :e].mT
            # dS = p (dp - rowsum(dp p)) in one kernel: autograd's own softmax backward (a private
            # name; the gradcheck in tests/fast/test_attention.py would catch a change of meaning).
            dscores = torch._softmax_backward_data(dp, p, -1, p.dtype)
            dq = (dscores @ k[:, :e]).mul_(1.0 / math.sqrt(hs))  # q was scaled in the forward
            slot_q[:, :, s:e] = dq.view(-1, n_head, e - s, hs)
            if dk is None or dv is None:  # the first part, which sees every key, starts them
                dk, dv = dscores.mT @ q[:, s:e], p.mT @ dy[:, s:e]
            else:  # (an in-place baddbmm_ into these slices falls back to one product per matrix)
                dk[:, :e] += dscores.mT @ q[:, s:e]
                dv[:, :e] += p.mT @ dy[:, s:e]
        assert dk is not None and dv is not None
        slot_k.copy_(dk.view_as(slot_k))
        slot_v.copy_(dv.view_as(slot_v))
        return dqkv, None


def _cpu_training(x: Tensor, training: bool) -> bool:
    """Whether a module in ``training`` mode, given ``x``, is in CPU training outside a compile."""
    on_cpu = x.device.type == "cpu"
    return on_cpu and training and torch.is_grad_enabled() and not torch.compiler.is_compiling()


class CPUTrainingAttention(CausalSelfAttention):
    """``CausalSelfAttention`` whose CPU training takes the tuned paths (above)."""

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        if cache is None and self.dropout == 0 and _cpu_training(x, self.training):
            qkv = self.c_attn(x)  # (B, T, 3C), in the dtype autocast chose: the attention keeps it
            with torch.autocast("cpu", enabled=False):
                y = CausalAttention.apply(qkv, self.n_head)  # type: ignore[no-untyped-call]
            return self.resid_dropout(self.c_proj(y))
        return super().forward(x, cache, layer)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if not _cpu_training(q, self.training):
            return super().attend(q, k, v)
        T, Tk, hs = q.size(2), k.size(2), q.size(3)
        q = q * (1.0 / math.sqrt(hs))
        if T != Tk or T < SPLIT_FROM:  # a cache offset, or too short to pay
            return self._scores_times_v(q, k, v)
        # Contiguous once, so that each half below is a view the products read as it is.
        q, k, v, half = q.contiguous(), k.contiguous(), v.contiguous(), T // 2
        first = self._scores_times_v(q[:, :, :half], k[:, :, :half], v[:, :, :half])
        second = self._scores_times_v(q[:, :, half:], k, v)
        # (B, T, nh, hs), returned as its (B, nh, T, hs) view: the heads' re-assembly copies nothing.
        return torch.cat([first.transpose(1, 2), second.transpose(1, 2)], dim=1).transpose(1, 2)

    def _scores_times_v(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The last Tq of Tk positions (q already scaled) against all Tk: (B, nh, Tq, hs) from
        q (B, nh, Tq, hs) and k, v (B, nh, Tk, hs)."""
        Tq, Tk = q.size(2), k.size(2)
        att = q @ k.transpose(-2, -1)  # (B, nh, Tq, Tk)
        att += causal_bias(Tq, Tk, att.dtype, q.device)  # query i sees keys 0 .. Tk - Tq + i
        with torch.autocast(q.device.type, enabled=False):
            att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        return att @ v  # (B, nh, Tq, hs)
