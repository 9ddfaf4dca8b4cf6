"""Generation, the plain loop a learner reads first: prefill, then one token at a time.

``generate`` is the whole idea in ~20 lines: feed the prompt once (filling the KV cache), then one
token at a time, each drawn from the last position's logits after temperature, top-k and top-p.
The filters are pure functions of the logits. The chatbot's generation (stop ids, a minimum answer
length, a repetition penalty, a window that slides past the context, text streams with stop strings)
builds on these in ``core/stream.py``. The fast engine (``minigpt2.fast``) changes none of this: it
makes ``model(...)`` faster. Tests: ``pytest tests/core/test_generate.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from minigpt2.core.model import GPT, KVCache
from minigpt2.errors import UserError


@torch.inference_mode()
def generate(
    model: GPT,
    prompt: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The reference loop: up to ``max_new_tokens`` ids after ``prompt``, within one context window."""
    if not prompt:
        raise ValueError("generation needs at least one prompt id")
    device = model.device
    cache = KVCache(model.config)
    idx = torch.tensor([list(prompt)[-model.config.block_size :]], device=device)  # (1, T)
    new: list[int] = []
    for _ in range(max_new_tokens):
        if cache.pos + idx.size(1) > model.config.block_size:
            break  # the window is full (``core/stream.py``'s ``generate_ids`` slides it instead)
        logits, _ = model(idx, cache=cache)  # the prompt first, then only the newest token
        nxt = sample(logits[0, -1], temperature, top_k, top_p, generator)
        new.append(nxt)
        idx = torch.tensor([[nxt]], device=device)  # (1, 1)
    return new


def sample(
    logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> int:
    """Draw one id from a position's logits (V,): greedy at temperature 0. The settings are
    ``SampleConfig``'s, checked there; logits holding NaN (damaged weights) are refused here."""
    logits = logits.float().cpu()
    check_finite_logits(logits)
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def apply_repetition_penalty(logits: Tensor, context: Tensor, penalty: float) -> Tensor:
    """Make ids already in ``context`` less likely (CTRL-style): positive logits are divided by
    ``penalty``, negative ones multiplied. logits: (V,), context: (n,) ids."""
    if penalty == 1.0 or context.numel() == 0:
        return logits
    seen = logits[context]
    logits = logits.clone()
    logits[context] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits, set the rest to -inf. ``k`` = 0 keeps all. (V,) -> (V,)."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of ids whose probabilities sum to >= ``p``. (V,) -> (V,)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    # Drop an id when the ids before it already reach p; the likeliest id always stays (even for a
    # p that is 0 in float32, which every id's "before it" reaches).
    drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= p
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def check_finite_logits(logits: Tensor) -> None:
    """Refuse logits (..., V) that hold NaN or +infinity: no distribution comes out of them. A barred
    id's -infinity is fine. Damaged weights (or a diverged run) give them."""
    if bool(torch.isnan(logits).any() or torch.isposinf(logits).any()):
        raise UserError(
            "the model's output is not a number (NaN or infinity): its weights are damaged or its"
            " training diverged; use another checkpoint or train again"
        )


def make_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
