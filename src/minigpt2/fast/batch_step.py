"""The forward pass of batched decoding: ``Decoder.step`` for B rows, each at its own position.

``BatchStep`` holds ``model``'s weights as ``Decoder`` flattens them (plain tensors, and each
linear layer as ``DenseLinear``, or ``Int8Linear`` where the model's ``decode_weights`` is "int8")
and a KV cache of ``max_rows`` slots, one (n_layer, 2, max_rows, nh, block_size, hs) buffer. A
call feeds one id to each of the rows in slots 0 .. B-1 and returns their next-token logits: the
same kernels as ``Decoder.step`` (layer norm, the linear layers' products, SDPA, tanh-GELU) with B
rows in each product, so the weights are read once for all rows.

Rows of different lengths share the pass: row b's id gets the position embedding of its own
position pos[b], its k and v are written at that position of its slot (one copy per layer for all
rows), and it attends over keys 0 .. Tk-1 (Tk = the longest row's length) through a boolean mask
that lets it see keys 0 .. pos[b] only; beyond them lie an earlier row's stale keys, or zeros.
``minigpt2.fast.batch_decoder`` decides which rows run; ``tests/fast/test_batch.py`` checks the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from minigpt2.core.model import GPT
from minigpt2.fast.decode import decoder_for


class BatchStep:
    """One-token steps for up to ``max_rows`` rows over ``model``'s weights (shared, not copied).

    Inference only. The cache is allocated at the first ``cache()`` in the dtype the model computes
    in (the autocast dtype inside an autocast region, as ``KVCache`` gets it from the model's k).
    """

    def __init__(self, model: GPT, max_rows: int) -> None:
        self.w = decoder_for(model)  # its weights, as the model's decode_weights names them
        self.config, self.max_rows, self.device = model.config, max_rows, model.device
        self.kv: Tensor | None = None
        self._where: Tensor | None = None  # (max_rows, 2, nh): see cache()

    def cache(self) -> Tensor:
        """The (n_layer, 2, max_rows, nh, block_size, hs) buffer, allocated at first use."""
        if self.kv is None:
            c, R, device = self.config, self.max_rows, self.device
            nh, block = c.n_head, c.block_size
            shape = (c.n_layer, 2, R, nh, block, c.n_embd // nh)
            self.kv = torch.zeros(shape, dtype=self.w.compute_dtype(), device=device)
            # A layer's cache seen as (2 * R * nh * block_size, hs) rows: the k (kind 0) or v (kind 1)
            # of head h of slot b at position 0 is row ((kind * R + b) * nh + h) * block_size.
            slot = torch.arange(R, device=device).view(R, 1, 1) + R * torch.arange(2, device=device).view(
                1, 2, 1
            )
            self._where = (slot * nh + torch.arange(nh, device=device).view(1, 1, nh)) * block  # (R, 2, nh)
        return self.kv

    def put(self, slot: int, kv: Tensor) -> None:
        """Copy a prefilled window, ``kv`` (n_layer, 2, nh, T, hs), into ``slot``'s positions 0 .. T-1."""
        self.cache()[:, :, slot, :, : kv.size(3)] = kv

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``."""
        if length and self.kv is not None:
            self.kv[:, :, dst, :, :length] = self.kv[:, :, src, :, :length]

    def __call__(self, ids: Tensor, pos: Tensor, Tk: int, ragged: bool) -> Tensor:
        """Feed ``ids`` (B,) at positions ``pos`` (B,) to the rows in slots 0 .. B-1 and return their
        next-token logits (B, V). ``Tk`` = max(pos) + 1; ``ragged``: not every pos is the same (when
        they are, every key up to Tk is every row's own, and no mask is needed)."""
        w, kv = self.w, self.cache()
        assert self._where is not None
        B, C, nh, hs, eps = ids.size(0), w.n_embd, w.n_head, w.hs, w.eps
        x = w.wte[ids] + w.wpe[pos]  # (B, C): the residual stream of each row's one new position
        mask = (torch.arange(Tk, device=ids.device) <= pos[:, None]).view(B, 1, 1, Tk) if ragged else None
        where = self._where[:B] + pos.view(B, 1, 1)  # (B, 2, nh): each row's new k, v rows in a layer
        for layer, lw in enumerate(w.blocks):
            qkv = lw.attn(F.layer_norm(x, (C,), lw.ln_1_w, lw.ln_1_b, eps))  # (B, 3C)
            cache = kv[layer]  # (2, R, nh, block_size, hs), contiguous
            # .to: under autocast the cache is bf16, and an int8 layer's product is fp32
            cache.view(-1, hs).index_put_((where,), qkv[:, C:].view(B, 2, nh, hs).to(cache.dtype))
            q = qkv[:, :C].view(B, nh, 1, hs)
            y = F.scaled_dot_product_attention(q, cache[0, :B, :, :Tk], cache[1, :B, :, :Tk], attn_mask=mask)
            # (B, nh, 1, hs) -> (B, C); added in place into x so that the residual stream stays fp32
            # under autocast, as in the model (see Decoder.step).
            x.add_(lw.attn_proj(y.reshape(B, C)))
            h = lw.fc(F.layer_norm(x, (C,), lw.ln_2_w, lw.ln_2_b, eps))  # (B, 4C)
            x.add_(lw.mlp_proj(F.gelu(h, approximate="tanh")))
        return torch.mm(F.layer_norm(x, (C,), *w.ln_f, eps), w.head_t)  # (B, V)
