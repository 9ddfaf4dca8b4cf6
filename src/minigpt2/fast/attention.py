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
  (B, nh, T, Tk) scores.

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


class CPUTrainingAttention(CausalSelfAttention):
    """``CausalSelfAttention`` whose ``attend`` takes the tuned path in CPU training."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if not (q.device.type == "cpu" and self.training and torch.is_grad_enabled()):
            return super().attend(q, k, v)
        T, Tk, hs = q.size(2), k.size(2), q.size(3)
        att = (q * (1.0 / math.sqrt(hs))) @ k.transpose(-2, -1)  # (B, nh, T, Tk)
        att += causal_bias(T, Tk, att.dtype, q.device)
        with torch.autocast(q.device.type, enabled=False):
            att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        return att @ v  # (B, nh, T, hs)
