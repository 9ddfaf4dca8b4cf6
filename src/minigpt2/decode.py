"""The fast one-token step of generation: ``GPT.forward`` for a single new token, written flat.

Decoding one character at batch 1 is ~24 matrix-vector products (over all the weights) and ~100
small operations. In ``model.py``'s readable form each small operation also pays for module calls,
dropout checks, head reshapes and cache bookkeeping, and on a CPU that overhead was as large as the
products themselves (a step of the ``shakespeare`` preset: 4.5 ms through the modules, 2.4 ms here,
same numbers, in one run). ``Decoder.step`` does the same arithmetic as ``model.py`` with the same
kernels as its default attention (layer norm, linear, SDPA, tanh-GELU), straight over the weights,
and writes into the same ``KVCache``. ``model.py`` stays the reference: ``generate_ids`` uses the
model itself for ``attn_impl="manual"`` and for a model in training mode (dropout), and
``tests/test_decode.py`` checks that both give the same logits and the same tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from minigpt2.model import GPT, KVCache


class _BlockWeights(NamedTuple):
    """One ``Block``'s parameters, as plain tensors (no ``nn.Parameter`` dispatch)."""

    ln_1_w: Tensor
    ln_1_b: Tensor
    attn_w: Tensor  # (3C, C): q, k, v for all heads at once
    attn_b: Tensor
    attn_proj_w: Tensor  # (C, C)
    attn_proj_b: Tensor
    ln_2_w: Tensor
    ln_2_b: Tensor
    fc_w: Tensor  # (4C, C)
    fc_b: Tensor
    mlp_proj_w: Tensor  # (C, 4C)
    mlp_proj_b: Tensor


# ``Block``'s parameter names, in ``_BlockWeights``'s order.
_BLOCK_PARAMS = tuple(
    f"{module}.{kind}"
    for module in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
    for kind in ("weight", "bias")
)


def _block_weights(block: nn.Module) -> _BlockWeights:
    params = dict(block.named_parameters())  # "ln_1.weight", "attn.c_attn.bias", ...
    return _BlockWeights(*(params[name].detach() for name in _BLOCK_PARAMS))


class Decoder:
    """One-token steps for batch-1 generation with ``model``'s weights (shared, not copied).

    Fill the cache first with the model itself (``model(idx, cache=cache)`` for the prompt), then
    call ``step`` once per new token. Inference only: no dropout, no gradients. The tensors are
    taken when the decoder is made: in-place updates (training, ``load_state_dict``) show, but
    build a new decoder after ``model.to(...)`` (``generate_ids`` makes one per call).
    """

    def __init__(self, model: GPT) -> None:
        c = model.config
        self.n_embd, self.n_head, self.hs = c.n_embd, c.n_head, c.n_embd // c.n_head
        t = model.transformer
        self.eps = t.ln_f.eps  # every LayerNorm of GPT-2 has the same
        self.wte, self.wpe = t.wte.weight.detach(), t.wpe.weight.detach()  # (V, C), (block_size, C)
        self.head = model.lm_head.weight.detach()  # (V, C): wte itself, as the weights are tied
        self.ln_f = (t.ln_f.weight.detach(), t.ln_f.bias.detach())
        self.blocks = [_block_weights(b) for b in t.h]

    def step(self, token: int, cache: KVCache) -> Tensor:
        """Feed ``token`` at position ``cache.pos`` and return the next token's logits (V,).

        The cache must already hold the earlier positions (batch 1) and have room for one more;
        it advances by one."""
        if cache.k is None or cache.v is None or cache.batch_size != 1:
            raise ValueError("Decoder.step needs a batch-1 cache filled by the model first")
        pos, C, nh, hs, eps = cache.pos, self.n_embd, self.n_head, self.hs, self.eps
        if pos >= self.wpe.size(0):
            raise ValueError(f"{pos + 1} positions exceed the context window of {self.wpe.size(0)}")
        # (1, C): the residual stream of the one new position (2-D, so each linear is one addmm).
        x = (self.wte[token] + self.wpe[pos]).view(1, C)
        for layer, w in enumerate(self.blocks):
            # Attention: q, k, v as (1, nh, 1, hs); this position's k and v join the cache.
            qkv = F.linear(F.layer_norm(x, (C,), w.ln_1_w, w.ln_1_b, eps), w.attn_w, w.attn_b)
            q, k, v = qkv.view(3, 1, nh, 1, hs)
            keys = cache.k[layer, :, :, : pos + 1]  # (1, nh, Tk, hs), a view into the cache
            values = cache.v[layer, :, :, : pos + 1]
            keys[:, :, pos:] = k
            values[:, :, pos:] = v
            # One query over the past needs no mask: every cached position is visible.
            y = F.scaled_dot_product_attention(q, keys, values)  # (1, nh, 1, hs)
            # reshape, not view: on a GPU, SDPA may return a slice of a padded head dimension.
            x = x + F.linear(y.reshape(1, C), w.attn_proj_w, w.attn_proj_b)
            # MLP: C -> 4C -> GELU (tanh) -> C.
            h = F.linear(F.layer_norm(x, (C,), w.ln_2_w, w.ln_2_b, eps), w.fc_w, w.fc_b)
            x = x + F.linear(F.gelu(h, approximate="tanh"), w.mlp_proj_w, w.mlp_proj_b)
        cache.pos = pos + 1
        return F.linear(F.layer_norm(x, (C,), *self.ln_f, eps), self.head)[0]  # (V,)
