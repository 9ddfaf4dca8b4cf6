"""GPT-2, exactly, at character level: attention, MLP, block, the KV cache, then the model.

Read top to bottom. Shapes use the same letters everywhere: B batch, T new positions, Tk positions
attended to (cached + new), C = n_embd, nh = n_head, hs = C // nh, V = vocab_size.

Parameter names follow Hugging Face's ``GPT2LMHeadModel`` (``transformer.h.0.attn.c_attn`` ...), so
the weights map one-to-one onto it; the only difference is that our ``nn.Linear`` stores (out, in)
where GPT-2's ``Conv1D`` stores (in, out). No I/O, no printing. Tests: ``pytest tests/test_model.py``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigpt2.config import ModelConfig

log = logging.getLogger(__name__)


def causal_mask(T: int, Tk: int, device: torch.device) -> Tensor:
    """(T, Tk) bool, True where a query may look. The T queries are the last T of the Tk positions,
    so query i (absolute position Tk - T + i) sees keys 0 .. Tk - T + i."""
    return torch.ones(T, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - T)


def causal_bias(T: int, Tk: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(T, Tk): 0 where a query may look (``causal_mask``), -inf where it may not. Added to the
    attention scores, it removes the future after the softmax; an addition costs a fraction of a
    ``masked_fill`` with a bool mask on the CPU, forward and backward."""
    return torch.zeros(T, Tk, dtype=dtype, device=device).masked_fill(~causal_mask(T, Tk, device), -math.inf)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a faster mask in CPU training when ``fast`` (``attn_impl="auto"``).

    torch's CPU ``bernoulli_`` costs ~9-15 ns per element, and dropout masks are the biggest random
    draws in training (the attention mask alone is B * nh * T * T per layer): with dropout 0.2 it was
    38% of a CPU training step. Here the random bits come from numpy's SFC64 generator (about 3x
    faster than torch's CPU generator), seeded from torch's generator on every call, so
    ``torch.manual_seed`` still fixes the masks; each 64-bit number is read as four uniform 16-bit
    ones. The 0/1 mask is made with an integer ``clamp``, not a comparison: torch's CPU kernels for
    bool tensors (compare, convert, ``where``) are several times slower than those for numbers. The
    result is the same dropout: each element is zeroed with probability p (to within 1/65536), the
    others are scaled by 1 / (1 - p).
    """

    def __init__(self, p: float, fast: bool = False) -> None:
        super().__init__(p)
        self.fast = fast

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x  # what nn.Dropout returns too, without its calls (they add up in decoding)
        if not self.fast or x.device.type != "cpu" or torch.compiler.is_compiling():
            return super().forward(x)  # compiled code makes its own fast masks
        n = x.numel()
        seed = int(torch.randint(2**63 - 1, ()))  # from torch's seeded generator
        bits = np.random.SFC64(seed).random_raw((n + 3) // 4)  # (n / 4,) uint64, all bits random
        uniform16 = torch.from_numpy(bits.view(np.int16)[:n]).view(x.shape)  # in [-32768, 32767]
        # Drop where uniform16 < cut: probability p, in steps of 1/65536 (kept inside int16's range).
        cut = -32768 + min(max(round(self.p * 65536), 1), 65535)
        # Clamping to [cut - 1, cut] and shifting gives 0 (drop) or 1 (keep), with no bool tensor.
        keep = uniform16.clamp(cut - 1, cut).sub_(cut - 1).to(x.dtype)
        return x * keep.mul_(1.0 / (1.0 - self.p))


class KVCache:
    """Keys and values of the positions already processed, for fast one-token-at-a-time decoding.

    ``kv`` is one (n_layer, 2, B, nh, block_size, hs) buffer (keys at index 0 of the second axis,
    values at 1, so that one copy stores both: ``decode.py`` does), allocated on first use in the
    dtype the model computes in (bf16 under autocast); ``pos`` is how many positions are filled.
    ``k`` and ``v`` are views of it, (n_layer, B, nh, block_size, hs) each.
    """

    def __init__(self, config: ModelConfig, batch_size: int = 1) -> None:
        self.config, self.batch_size = config, batch_size
        self.kv: Tensor | None = None
        self.pos = 0

    @property
    def k(self) -> Tensor | None:
        return None if self.kv is None else self.kv[:, 0]

    @property
    def v(self) -> Tensor | None:
        return None if self.kv is None else self.kv[:, 1]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this layer's new k, v (B, nh, T, hs) and return all keys/values so far (B, nh, Tk, hs)."""
        T = k.size(2)
        if self.kv is None:
            c = self.config
            shape = (c.n_layer, 2, self.batch_size, c.n_head, c.block_size, c.n_embd // c.n_head)
            self.kv = torch.zeros(shape, dtype=k.dtype, device=k.device)
        kv = self.kv[layer, :, :, :, : self.pos + T]  # (2, B, nh, Tk, hs)
        kv[0, :, :, self.pos :] = k
        kv[1, :, :, self.pos :] = v
        return kv[0], kv[1]

    def reset(self) -> None:
        self.pos = 0


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and the past."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.dropout, self.impl = config.n_head, config.dropout, config.attn_impl
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)  # heads back into the residual stream
        fast = config.attn_impl == "auto"
        self.attn_dropout = Dropout(config.dropout, fast)
        self.resid_dropout = Dropout(config.dropout, fast)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        # Split C into nh heads of size hs and move heads next to batch: (B, nh, T, hs).
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, Tk, hs): cached positions + these T
        Tk = k.size(2)
        if self._use_manual(x):
            y = self._manual_attention(q, k, v)
        else:
            # One fused kernel; the mask is implicit when queries and keys line up (no cache, or a
            # fresh cache), unnecessary for a single new token, and explicit otherwise.
            mask = None if T == Tk or T == 1 else causal_mask(T, Tk, x.device)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=(T == Tk and T > 1),
                dropout_p=self.dropout if self.training else 0.0,
            )  # fmt: skip
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def _use_manual(self, x: Tensor) -> bool:
        """``auto`` takes the measured-faster path: in CPU training the plain matmuls (which run on
        the CPU's bf16 units) beat PyTorch's CPU flash-attention backward; elsewhere SDPA wins."""
        if self.impl == "auto":
            return x.device.type == "cpu" and self.training and torch.is_grad_enabled()
        return self.impl == "manual"

    def _manual_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The readable reference: softmax(q k^T / sqrt(hs), masked to the past) v."""
        T, Tk, hs = q.size(2), k.size(2), q.size(3)
        # Scaling q rather than the scores gives the same numbers on a tensor Tk/hs times smaller.
        att = (q * (1.0 / math.sqrt(hs))) @ k.transpose(-2, -1)  # (B, nh, T, Tk) similarity scores
        att += causal_bias(T, Tk, att.dtype, q.device)  # -inf on the future: no peeking ahead
        # Each row: how much each query attends to each key. The softmax runs in the scores' own
        # dtype: under autocast that is bf16, whose kernels sum in fp32 and round once (forward: the
        # same numbers as an fp32 softmax rounded to bf16; backward: within bf16 rounding), while
        # the fp32 softmax autocast would pick costs two extra copies of the (B, nh, T, Tk) scores.
        with torch.autocast(q.device.type, enabled=False):
            att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        return att @ v  # (B, nh, T, hs): weighted average of the values


# GPT-2's GELU: 0.5 x (1 + tanh(z)), z = sqrt(2/pi) (x + 0.044715 x^3). Since 1 + tanh(z) = 2 sigmoid(2z),
# it is also x * sigmoid(2z) = x * sigmoid(x (A + B x^2)) with these two constants.
_GELU_A = 2.0 * math.sqrt(2.0 / math.pi)
_GELU_B = _GELU_A * 0.044715


def gelu_tanh_via_sigmoid(x: Tensor) -> Tensor:
    """GPT-2's tanh GELU written as ``x * sigmoid(2z)``: the same function, computed in fp32 and
    rounded once to ``x``'s dtype. Shape-preserving. ``GELU`` compiles it into one loop."""
    xf = x.float()
    return (xf * torch.sigmoid(xf * (_GELU_A + _GELU_B * xf * xf))).to(x.dtype)


@functools.cache
def _compiled_gelu() -> Callable[[Tensor], Tensor]:
    # Built on first use: torch.compile imports its compiler stack (seconds), which only training
    # on a CPU needs. dynamic=True: one kernel for every batch and pass shape.
    return torch.compile(gelu_tanh_via_sigmoid, dynamic=True)


class GELU(nn.GELU):
    """``nn.GELU(approximate="tanh")``, with one compiled loop in CPU training when ``fast``.

    PyTorch's CPU tanh (accurate to 1 ulp, and slow) makes its tanh GELU about 4x slower than its
    erf GELU; forward and backward were 14-18% of a bf16 CPU training step. In that case (``fast``,
    i.e. ``attn_impl="auto"``; a CPU; training; at least ``COMPILED_MIN_NUMEL`` elements) this runs
    ``gelu_tanh_via_sigmoid`` compiled by ``torch.compile`` into one loop for the forward and one
    for the backward (~2x faster together; the `cpu` preset's whole step 5-6% faster in bf16, 16%
    in fp32), after ~8 s of compiling once per machine (the compiled code is cached on disk). Its
    bf16 results equal ``F.gelu``'s above x = -2.9 and are within bf16 rounding of the exact GELU
    everywhere; below -2.9, where GELU is under 0.006 in size, ``F.gelu``'s ``1 + tanh(z)`` loses
    digits to cancellation (in bf16, up to all of them). In fp32 both agree to fp32 rounding. If
    compiling fails (no C++ compiler), it warns once and uses ``F.gelu``.
    """

    # A compiled call costs ~0.1-0.2 ms more than an eager one (guards, autograd wrapper), which
    # the faster loop earns back only on large tensors: in fp32, 0.15 ms (F.gelu) against 0.21 ms
    # (compiled) forward + backward at 32K elements (the `tiny` preset), 7 ms against 3.5 ms at
    # 2.4M (24 x 128 x 768: the `cpu` preset's shape with batch 24). Break-even is near 120K elements.
    COMPILED_MIN_NUMEL = 1 << 18

    broken = False  # set for the whole process once compiling has failed

    def __init__(self, fast: bool = False) -> None:
        super().__init__(approximate="tanh")
        self.fast = fast

    def forward(self, x: Tensor) -> Tensor:
        if (
            self.fast
            and not GELU.broken
            and x.device.type == "cpu"
            and x.numel() >= GELU.COMPILED_MIN_NUMEL
            and self.training
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()  # a compiled model fuses F.gelu itself
        ):
            try:
                return _compiled_gelu()(x)
            except Exception as err:  # no compiler, an unsupported platform: stay correct, go slower
                GELU.broken = True
                log.warning(
                    "the compiled GELU failed (%s); training goes on with F.gelu (slower)",
                    (str(err).splitlines() or [type(err).__name__])[0][:200],
                )
        return super().forward(x)


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> GELU (tanh approximation, as GPT-2) -> C."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.act = GELU(fast=config.attn_impl == "auto")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = Dropout(config.dropout, fast=config.attn_impl == "auto")

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The body of GPT-2 (Hugging Face's ``GPT2Model``): embeddings, blocks, final LayerNorm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned position embeddings
        self.drop = Dropout(config.dropout, fast=config.attn_impl == "auto")
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=1e-5)


class GPT(nn.Module):
    """Token + position embeddings, ``n_layer`` blocks, final LayerNorm, LM head tied to ``wte``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: reading a character in and writing it out share one matrix (GPT-2 does).
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): each block adds two of
        # them to the residual stream, and this keeps its variance from growing with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """idx: (B, T) token ids -> logits (B, T, V), and the mean cross-entropy if ``targets``.

        ``targets`` (B, T) holds the next id at each position; -1 marks positions left out of
        the loss. With ``cache``, ``idx`` continues the cached positions and the cache advances.
        """
        T = idx.size(1)
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"{start + T} positions exceed the context window of {self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            # Cross-entropy in fp32 even under autocast: a sum over the vocabulary of small numbers.
            # Sum, then divide by the counted targets: the mean, but 0 (not NaN) for a batch with
            # no targets at all (bot-only loss on a window of user text).
            flat = targets.reshape(-1)
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), flat, ignore_index=-1, reduction="sum"
            ) / (flat != -1).sum().clamp(min=1)
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (the tied head is the token embedding). ``non_embedding``
        leaves out the position embeddings too, as GPT-2's parameter counts do."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B: 6N + 12 L C T."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * c.block_size
