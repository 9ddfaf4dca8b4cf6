"""Attention tuned for CPU training: the drop-in for ``CausalSelfAttention.attend``.

In CPU training, plain matrix products (which run on the CPU's bf16 units under autocast) beat
PyTorch's CPU flash-attention backward, and three details of the written-out attention make it
faster still, computing the same function:

- q is scaled by 1/sqrt(hs) before the product, not the scores after: the same function (to
  rounding) on a tensor Tk/hs times smaller;
- the causal mask is added as a bias of 0 / -inf: an addition costs a fraction of a ``masked_fill``
  with a bool mask on the CPU, forward and backward;
- the softmax runs in the scores' own dtype: under autocast that is bf16, whose kernels sum in fp32
  and round once (forward: the same numbers as an fp32 softmax rounded to bf16; backward: within
  bf16 rounding), while the fp32 softmax autocast would pick costs two extra copies of the
  (B, nh, T, Tk) scores;
- from a context of ``SPLIT_FROM`` on, the queries are cut in two halves: the first half's queries
  see only the first half's keys, so their scores against the second half, all masked, are never
  computed: 3/4 of the (B, nh, T, T) scores, softmax and products, forward and backward. The
  scores are what a CPU spends its attention time moving through memory. The halves' outputs are
  joined straight into the (B, T, nh, hs) layout the block re-assembles the heads from.

Everywhere else (inference, GPUs) it is the textbook's ``attend``. Measured with the rest of the
engine in ``benchmarks/train_throughput.py``; tests: ``pytest tests/fast/test_fast.py -k attention``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from minigpt2.core.model import CausalSelfAttention, causal_mask


def causal_bias(T: int, Tk: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(T, Tk): 0 where a query may look (``causal_mask``), -inf where it may not."""
    return torch.zeros(T, Tk, dtype=dtype, device=device).masked_fill(~causal_mask(T, Tk, device), -math.inf)


# The context from which the queries are cut in two (above). The attention's forward + backward
# in fp32 on 6,144 tokens, restricted to AVX2: 1.3-1.4x faster at T = 256, 1.0-1.1x at 128 (the
# `cpu` preset's whole step 1.01-1.02x), slower at 64.
SPLIT_FROM = 128


class CPUTrainingAttention(CausalSelfAttention):
    """``CausalSelfAttention`` whose ``attend`` takes the tuned path in CPU training."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if not (q.device.type == "cpu" and self.training and torch.is_grad_enabled()):
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
