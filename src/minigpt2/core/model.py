"""GPT-2, exactly, at character level: the KV cache, attention, MLP, block, then the model.

Read top to bottom. Shapes use the same letters everywhere: B batch, T new positions, Tk positions
attended to (cached + new), C = n_embd, nh = n_head, hs = C // nh, V = vocab_size.

Parameter names follow Hugging Face's ``GPT2LMHeadModel`` (``transformer.h.0.attn.c_attn`` ...), so
the weights map one-to-one onto it; the only difference is that our ``nn.Linear`` stores (out, in)
where GPT-2's ``Conv1D`` stores (in, out).

This is the reference. ``minigpt2.fast`` swaps faster drop-ins for some of these pieces (it never
edits this file) and tests that each computes what the piece here computes.
Tests: ``pytest tests/core/test_model.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigpt2.core.config import ModelConfig


class KVCache:
    """Keys and values of the positions already processed, so that generating one more token
    costs one position's work instead of the whole window's.

    ``kv`` is one (n_layer, 2, B, nh, block_size, hs) buffer (keys at index 0 of the second axis,
    values at 1), allocated on first use in the dtype the model computes in (bf16 under autocast);
    ``pos`` is how many positions are filled. ``k`` and ``v`` are views of it.
    """

    def __init__(self, config: ModelConfig, batch_size: int = 1) -> None:
        self.config, self.batch_size = config, batch_size
        self.kv: Tensor | None = None
        self.pos = 0

    @property
    def k(self) -> Tensor | None:
        return None if self.kv is None else self.kv[:, 0]  # (n_layer, B, nh, block_size, hs)

    @property
    def v(self) -> Tensor | None:
        return None if self.kv is None else self.kv[:, 1]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this layer's new k, v (B, nh, T, hs) and return all keys/values so far (B, nh, Tk, hs).
        ``pos`` stays: the model advances it once every layer has stored its T positions."""
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


def causal_mask(T: int, Tk: int, device: torch.device) -> Tensor:
    """(T, Tk) bool, True where a query may look. The T queries are the last T of the Tk positions,
    so query i (absolute position Tk - T + i) sees keys 0 .. Tk - T + i."""
    return torch.ones(T, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - T)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and the past."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.dropout, self.attn_impl = config.n_head, config.dropout, config.attn_impl
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)  # heads back into the residual stream
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

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
        y = self.attend(q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(hs), masked to the past) v: (B, nh, T, hs) from q (B, nh, T, hs)
        and k, v (B, nh, Tk, hs)."""
        T, Tk = q.size(2), k.size(2)
        if self.attn_impl == "sdpa":
            # The same computation as below in one fused kernel. The mask is implicit when queries
            # and keys line up, unneeded for a single new token, and explicit otherwise.
            mask = None if T == Tk or T == 1 else causal_mask(T, Tk, q.device)
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=(T == Tk and T > 1),
                dropout_p=self.dropout if self.training else 0.0,
            )  # fmt: skip
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, Tk) similarity scores
        att = att.masked_fill(~causal_mask(T, Tk, q.device), float("-inf"))  # no peeking ahead
        att = F.softmax(att, dim=-1)  # each row: how much this query attends to each key
        att = self.attn_dropout(att)
        return att @ v  # (B, nh, T, hs): weighted average of the values


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> GELU (tanh approximation, as GPT-2) -> C."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, C) -> (B, T, 4C) -> (B, T, C)."""
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
        """x: (B, T, C) -> (B, T, C); ``layer``: this block's index in the KV cache."""
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The body of GPT-2 (Hugging Face's ``GPT2Model``): embeddings, blocks, final LayerNorm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned position embeddings
        self.drop = nn.Dropout(config.dropout)
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
        """idx: (B, T) token ids -> (logits, loss).

        Training (``targets`` (B, T): the next id at each position, -1 where it does not count):
        logits (B, T, V) and the mean cross-entropy. Inference (no targets): only the last position
        goes through the head, logits (B, 1, V), loss None. With ``cache``, ``idx`` continues the
        cached positions and the cache advances.
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
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, V): what comes next
        logits = self.lm_head(x)  # (B, T, V)
        # Cross-entropy in fp32 even under autocast: a sum over the vocabulary of small numbers.
        # Sum, then divide by the counted targets: the mean, but 0 (not NaN) for a batch with no
        # targets at all (bot-only loss on a window of user text).
        flat = targets.reshape(-1)
        loss = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), flat, ignore_index=-1, reduction="sum"
        ) / (flat != -1).sum().clamp(min=1)
        return logits, loss

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (the tied head is the token embedding). ``non_embedding``
        leaves out the position embeddings, as GPT-2's parameter counts do (``wte`` stays: it is
        also the head's weight)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B: 6N + 12 L C T."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * c.block_size
