"""The fast one-token step of generation: ``GPT.forward`` for a single new token, written flat.

Decoding one character at batch 1 is ~24 matrix-vector products (over all the weights) and ~100
small operations. In ``model.py``'s readable form each small operation also pays for module calls,
dropout checks, head reshapes and cache bookkeeping, and on a CPU that overhead was as large as the
products themselves (a step of the ``shakespeare`` preset: 4.5 ms through the modules, 2.4 ms here,
same numbers, in one run). ``Decoder.step`` does the same arithmetic as ``model.py`` with the same
kernels as its default attention (layer norm, the addmm behind each linear layer, SDPA, tanh-GELU),
straight over the weights, and writes into the same ``KVCache``.

``FastGPT`` is the drop-in for ``GPT``: its ``forward`` sends one new token with a filled cache, at
inference, through ``Decoder.step``, and everything else (prompts, refills, training) through
``GPT.forward``; so the textbook's generation loop runs unchanged and gets the fast step.
``tests/test_decode.py`` checks that both give the same logits and the same tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigpt2.core.model import GPT, KVCache


class _BlockWeights(NamedTuple):
    """One ``Block``'s parameters as plain tensors (no ``nn.Parameter`` dispatch), the linear
    layers' weights transposed to (in, out): ``torch.addmm(b, x, w_t)`` is what ``F.linear(x, w, b)``
    runs, without the transpose and dispatch each call (~5% of a step)."""

    ln_1_w: Tensor
    ln_1_b: Tensor
    attn_w_t: Tensor  # (C, 3C): q, k, v for all heads at once
    attn_b: Tensor
    attn_proj_w_t: Tensor  # (C, C)
    attn_proj_b: Tensor
    ln_2_w: Tensor
    ln_2_b: Tensor
    fc_w_t: Tensor  # (C, 4C)
    fc_b: Tensor
    mlp_proj_w_t: Tensor  # (4C, C)
    mlp_proj_b: Tensor


# ``Block``'s parameter names, in ``_BlockWeights``'s order.
_BLOCK_PARAMS = tuple(
    f"{module}.{kind}"
    for module in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
    for kind in ("weight", "bias")
)


def _block_weights(block: nn.Module) -> _BlockWeights:
    params = dict(block.named_parameters())  # "ln_1.weight", "attn.c_attn.bias", ...
    tensors = (params[name].detach() for name in _BLOCK_PARAMS)
    # The 2-D ones are the linear weights; .t() is a view, so the model's memory is still shared.
    return _BlockWeights(*(t.t() if t.dim() == 2 else t for t in tensors))


class Decoder:
    """One-token steps for batch-1 generation with ``model``'s weights (shared, not copied).

    Fill the cache first with the model itself (``model(idx, cache=cache)`` for the prompt), then
    call ``step`` once per new token. Inference only: no dropout, no gradients. The tensors are
    taken when the decoder is made: in-place updates (training, ``load_state_dict``) show, but a
    decoder made before ``model.to(...)`` keeps the old tensors. ``FastGPT`` makes a new one after
    every prompt or refill; a caller that drives ``Decoder`` itself must do the same.
    """

    def __init__(self, model: GPT) -> None:
        c = model.config
        self.n_embd, self.n_head, self.hs = c.n_embd, c.n_head, c.n_embd // c.n_head
        t = model.transformer
        self.eps = t.ln_f.eps  # every LayerNorm of GPT-2 has the same
        self.wte, self.wpe = t.wte.weight.detach(), t.wpe.weight.detach()  # (V, C), (block_size, C)
        self.head_t = model.lm_head.weight.detach().t()  # (C, V): wte, as the weights are tied
        self.ln_f = (t.ln_f.weight.detach(), t.ln_f.bias.detach())
        self.blocks = [_block_weights(b) for b in t.h]

    def step(self, token: int | Tensor, cache: KVCache) -> Tensor:
        """Feed ``token`` (an id, or a (1,) tensor of one) at position ``cache.pos`` and return the
        next token's logits (V,).

        The cache must already hold the earlier positions (batch 1) and have room for one more;
        it advances by one."""
        if cache.kv is None or cache.batch_size != 1:
            raise ValueError("Decoder.step needs a batch-1 cache filled by the model first")
        pos, C, nh, hs, eps = cache.pos, self.n_embd, self.n_head, self.hs, self.eps
        if pos >= self.wpe.size(0):
            raise ValueError(f"{pos + 1} positions exceed the context window of {self.wpe.size(0)}")
        # (1, C): the residual stream of the one new position (2-D, so each linear is one addmm).
        x = (self.wte[token] + self.wpe[pos]).view(1, C)
        for layer, w in enumerate(self.blocks):
            # Attention: q, k, v for all heads, (1, 3C); this position's k and v join the cache in
            # one copy (the cache keeps both in one buffer for that).
            qkv = torch.addmm(w.attn_b, F.layer_norm(x, (C,), w.ln_1_w, w.ln_1_b, eps), w.attn_w_t)
            kv = cache.kv[layer, :, :, :, : pos + 1]  # (2, 1, nh, Tk, hs), a view into the cache
            kv.select(3, pos).copy_(qkv[:, C:].view(2, 1, nh, hs))
            q = qkv[:, :C].view(1, nh, 1, hs)
            # One query over the past needs no mask: every cached position is visible.
            y = F.scaled_dot_product_attention(q, kv[0], kv[1])  # (1, nh, 1, hs)
            # reshape, not view: on a GPU, SDPA may return a slice of a padded head dimension.
            # Added in place into x (a fresh tensor of this step), not into the product: under
            # autocast the product is bf16, and the residual stream stays fp32, as in the model.
            x.add_(torch.addmm(w.attn_proj_b, y.reshape(1, C), w.attn_proj_w_t))
            # MLP: C -> 4C -> GELU (tanh) -> C.
            h = torch.addmm(w.fc_b, F.layer_norm(x, (C,), w.ln_2_w, w.ln_2_b, eps), w.fc_w_t)
            x.add_(torch.addmm(w.mlp_proj_b, F.gelu(h, approximate="tanh"), w.mlp_proj_w_t))
        cache.pos = pos + 1
        return torch.mm(F.layer_norm(x, (C,), *self.ln_f, eps), self.head_t)[0]  # (V,)


class FastGPT(GPT):
    """``GPT`` whose one-token inference steps run through ``Decoder.step`` (same numbers)."""

    _decoder: Decoder | None = None  # built at the first step after each prompt

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[Tensor, Tensor | None]:
        one_step = (
            cache is not None
            and cache.pos > 0
            and cache.batch_size == 1
            and idx.shape == (1, 1)
            and targets is None
            and not self.training
            and not torch.is_grad_enabled()
        )
        if not one_step:
            # A prompt or a refill (or training): the model itself. Decoding starts afresh after it,
            # with a decoder over the weights as they are now (after .to(), load_state_dict, ...).
            self._decoder = None
            return super().forward(idx, targets, cache)
        assert cache is not None
        decoder = self._decoder or Decoder(self)  # one read: another thread may reset it meanwhile
        self._decoder = decoder
        return decoder.step(idx[0], cache).view(1, 1, -1), None  # (1, 1, V)
