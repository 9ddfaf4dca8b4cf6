"""The fast one-token step of generation: ``GPT.forward`` for a single new token, written flat.

Decoding one character at batch 1 is ~24 matrix-vector products (over all the weights) and ~100
small operations. In ``model.py``'s readable form each small operation also pays for module calls,
dropout checks, head reshapes and cache bookkeeping, and on a CPU that overhead was as large as the
products themselves (a step of the ``shakespeare`` preset: 4.5 ms through the modules, 2.4 ms here,
same numbers, in one run). ``Decoder.step`` does the same arithmetic as ``model.py`` with the same
kernels as its default attention (layer norm, the addmm behind each linear layer, SDPA, tanh-GELU),
straight over the weights, and writes into the same ``KVCache``. With ``weights="int8"`` the
four linear layers of each block read int8 copies of their weights instead (``fast/int8.py``: a
quarter of the bytes, different numbers), the rest is the same.

``FastGPT`` is the drop-in for ``GPT``: its ``forward`` sends one new token with a filled cache, at
inference, through ``Decoder.step``, and everything else (prompts, refills, training) through
``GPT.forward``; so the textbook's generation loop runs unchanged and gets the fast step.
Its ``decode_weights`` ("fp32" unless set, as ``load_for_inference`` does) names the weights; with
"int8", a prompt's last id goes through the step too (the model fills the cache with the others),
as ``BatchDecoder`` feeds it, so an answer's first id comes from the same numbers alone or batched.
``tests/fast/test_decode.py`` checks that both give the same logits and the same tokens in fp32;
``tests/fast/test_int8.py`` the int8 steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigpt2.core.model import GPT, Block, KVCache
from minigpt2.fast.int8 import DenseLinear, Int8Linear, Linear


class _BlockWeights(NamedTuple):
    """One ``Block``'s parameters as plain tensors (no ``nn.Parameter`` dispatch) and its four
    linear layers as ``DenseLinear`` or ``Int8Linear`` (``fast/int8.py``): x (B, in) -> (B, out)."""

    ln_1_w: Tensor
    ln_1_b: Tensor
    attn: Linear  # C -> 3C: q, k, v for all heads at once
    attn_proj: Linear  # C -> C
    ln_2_w: Tensor
    ln_2_b: Tensor
    fc: Linear  # C -> 4C
    mlp_proj: Linear  # 4C -> C


def _block_weights(block: Block, linear: Callable[[Tensor, Tensor], Linear]) -> _BlockWeights:
    def layer(module: nn.Linear) -> Linear:
        return linear(module.weight, module.bias)

    ln_1, ln_2, attn, mlp = block.ln_1, block.ln_2, block.attn, block.mlp
    return _BlockWeights(
        ln_1.weight.detach(), ln_1.bias.detach(), layer(attn.c_attn), layer(attn.c_proj),
        ln_2.weight.detach(), ln_2.bias.detach(), layer(mlp.c_fc), layer(mlp.c_proj),
    )  # fmt: skip


class Decoder:
    """One-token steps for batch-1 generation with ``model``'s weights (shared, not copied).

    Fill the cache with the prompt through the model's own forward (``GPT.forward(model, idx,
    cache=cache)``), or start from an empty one, then call ``step`` once per new token. Inference
    only: no dropout, no gradients. ``weights``: "fp32" runs the linear layers over the model's own
    tensors, taken when the decoder is made (in-place updates show; ``model.to(...)`` makes new
    tensors the decoder does not see); "int8" over an int8 copy of them (``fast/int8.py``), which
    no update reaches. ``decoder_for`` hands out a model's decoder and makes a new one whenever the
    weights have changed.
    """

    def __init__(self, model: GPT, weights: str = "fp32") -> None:
        if weights not in ("fp32", "int8"):
            raise ValueError(f"weights must be fp32 or int8, got {weights!r}")
        c = model.config
        self.weights = weights
        self.n_embd, self.n_head, self.hs = c.n_embd, c.n_head, c.n_embd // c.n_head
        t = model.transformer
        self.eps = t.ln_f.eps  # every LayerNorm of GPT-2 has the same
        self.wte, self.wpe = t.wte.weight.detach(), t.wpe.weight.detach()  # (V, C), (block_size, C)
        self.head_t = model.lm_head.weight.detach().t()  # (C, V): wte, as the weights are tied
        self.ln_f = (t.ln_f.weight.detach(), t.ln_f.bias.detach())
        linear = Int8Linear if weights == "int8" else DenseLinear
        self.blocks = [_block_weights(cast(Block, b), linear) for b in t.h]

    def compute_dtype(self) -> torch.dtype:
        """The dtype the model computes in here: the autocast dtype inside an autocast region (the
        dtype of the k and v a cache holds), else its weights'."""
        device = self.wte.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.wte.dtype

    def step(self, token: int | Tensor, cache: KVCache) -> Tensor:
        """Feed ``token`` (an id, or a (1,) tensor of one) at position ``cache.pos`` and return the
        next token's logits (V,).

        The cache (batch 1) holds the earlier positions, if any, and must have room for one more;
        it advances by one."""
        if cache.batch_size != 1:
            raise ValueError("Decoder.step needs a batch-1 cache")
        pos, C, nh, hs, eps = cache.pos, self.n_embd, self.n_head, self.hs, self.eps
        if pos >= self.wpe.size(0):
            raise ValueError(f"{pos + 1} positions exceed the context window of {self.wpe.size(0)}")
        if cache.kv is None:  # nothing cached yet: the buffer the model would make (KVCache.update)
            c = cache.config
            shape = (c.n_layer, 2, 1, c.n_head, c.block_size, c.n_embd // c.n_head)
            cache.kv = torch.zeros(shape, dtype=self.compute_dtype(), device=self.wte.device)
        # (1, C): the residual stream of the one new position (2-D, so each linear is one product).
        x = (self.wte[token] + self.wpe[pos]).view(1, C)
        for layer, w in enumerate(self.blocks):
            # Attention: q, k, v for all heads, (1, 3C); this position's k and v join the cache in
            # one copy (the cache keeps both in one buffer for that).
            qkv = w.attn(F.layer_norm(x, (C,), w.ln_1_w, w.ln_1_b, eps))
            kv = cache.kv[layer, :, :, :, : pos + 1]  # (2, 1, nh, Tk, hs), a view into the cache
            kv.select(3, pos).copy_(qkv[:, C:].view(2, 1, nh, hs))
            q = qkv[:, :C].view(1, nh, 1, hs)
            # One query over the past needs no mask: every cached position is visible.
            y = F.scaled_dot_product_attention(q, kv[0], kv[1])  # (1, nh, 1, hs)
            # reshape, not view: on a GPU, SDPA may return a slice of a padded head dimension.
            # Added in place into x (a fresh tensor of this step), not into the product: under
            # autocast the product is bf16, and the residual stream stays fp32, as in the model.
            x.add_(w.attn_proj(y.reshape(1, C)))
            # MLP: C -> 4C -> GELU (tanh) -> C.
            h = w.fc(F.layer_norm(x, (C,), w.ln_2_w, w.ln_2_b, eps))
            x.add_(w.mlp_proj(F.gelu(h, approximate="tanh")))
        cache.pos = pos + 1
        return torch.mm(F.layer_norm(x, (C,), *self.ln_f, eps), self.head_t)[0]  # (V,)


def decoder_for(model: GPT) -> Decoder:
    """``model``'s decoder, with the weights ``model.decode_weights`` names ("fp32" unless set;
    int8 only on a CPU, as its kernel is a CPU one: a model moved elsewhere decodes in fp32): the
    one made last while the parameters are the same tensors, not updated in place since (an int8
    copy takes ~20 ms to make for 10M parameters), else a new one."""
    weights = getattr(model, "decode_weights", "fp32") if model.device.type == "cpu" else "fp32"
    # Each tensor's storage and in-place version count: training steps, load_state_dict and
    # .to() change one of them (writing through ``p.data`` does not: it bypasses the count).
    key = (weights, *((p.data_ptr(), p._version) for p in model.parameters()))
    made: tuple[tuple[object, ...], Decoder] | None = model.__dict__.get("_decoder_made")
    if made is None or made[0] != key:
        made = (key, Decoder(model, weights))
        model.__dict__["_decoder_made"] = made
    return made[1]


class FastGPT(GPT):
    """``GPT`` whose one-token inference steps run through ``Decoder.step`` (same numbers with
    ``decode_weights`` "fp32"; "int8": the linear layers' weights as int8, ``fast/int8.py``)."""

    decode_weights = "fp32"  # set on a model for inference (``inference.load_for_inference``)
    _decoder: Decoder | None = None  # for the steps after the current prompt

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[Tensor, Tensor | None]:
        inference = targets is None and not self.training and not torch.is_grad_enabled()
        if cache is None or cache.batch_size != 1 or idx.size(0) != 1 or not inference:
            return super().forward(idx, targets, cache)  # training, or no cache to decode into
        one_token = cache.pos > 0 and idx.size(1) == 1
        if not one_token:
            # A prompt or a refill: the model itself. The steps after it ask decoder_for again,
            # which sees whether the weights changed (.to(), training, ...).
            self._decoder = None
            if self.decode_weights != "int8":
                return super().forward(idx, targets, cache)
            # With int8 weights the model fills the cache with all but the last id, and the last
            # goes through the int8 step, as BatchDecoder feeds every row's newest id through its
            # batched step: the first id after a prompt is drawn from the same numbers alone as
            # in a batch.
            if idx.size(1) > 1:
                super().forward(idx[:, :-1], cache=cache)
            idx = idx[:, -1:]
        decoder = self._decoder or decoder_for(self)  # one read: another thread may reset it meanwhile
        self._decoder = decoder
        return decoder.step(idx[0], cache).view(1, 1, -1), None  # (1, 1, V)
