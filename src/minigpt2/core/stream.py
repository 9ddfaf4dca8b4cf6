"""The chatbot's generation: streams of ids and of text, with the rules a conversation needs.

``generate_ids`` is ``generate``'s loop (``core/generate.py``) with stop ids, a minimum answer
length, a repetition penalty and a window that slides past the context; ``stream_text`` adds the
tokenizer and stop strings. Both are generators, so callers print (or display) each character as
soon as it exists; nothing here prints.

Past the context window the window slides: when it is full, generation keeps the newest
``block_size // 2`` ids and refills the KV cache from them, so long outputs cost one refill (a
forward pass over half a window) about every ``block_size // 2`` characters. Keeping 3/4 of the
window kept more context but made refills a fifth of the decoding time. A prompt longer than the
window starts from its last ``block_size`` ids. The cache-free path (``use_cache=False``) slides the
window at the same points, so both give the same tokens.
Tests: ``pytest tests/test_generate.py tests/test_decode.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from minigpt2.core.config import SampleConfig
from minigpt2.core.generate import apply_repetition_penalty, make_generator, sample
from minigpt2.core.model import GPT, KVCache
from minigpt2.core.precision import Precision
from minigpt2.core.tokenizer import EOT_ID, CharTokenizer


def next_token(logits: Tensor, cfg: SampleConfig, context: Tensor, generator: torch.Generator) -> int:
    """Pick the next id from the last position's logits (V,), given the ids in the window."""
    logits = apply_repetition_penalty(logits.float().cpu(), context.cpu(), cfg.repetition_penalty)
    return sample(logits, cfg.temperature, cfg.top_k, cfg.top_p, generator)


def first_window(n_prompt: int, block_size: int) -> int:
    """Where the window starts over a prompt of ``n_prompt`` ids: its last ``block_size`` of them."""
    return max(0, n_prompt - block_size)


def slid_window(n_tokens: int, start: int, block_size: int) -> int:
    """Where the window ``tokens[start:]`` of ``n_tokens`` ids starts for the next forward pass:
    where it did while it holds at most ``block_size`` ids; once it holds more, it slides to the
    newest ``block_size // 2`` (at least one). A start that moved means the cache must be refilled.
    ``generate_ids`` and the fast engine's batched rows both slide by this rule."""
    if n_tokens - start <= block_size:
        return start
    return n_tokens - max(1, block_size // 2)


@torch.inference_mode()
def generate_ids(
    model: GPT,
    prompt: Sequence[int],
    cfg: SampleConfig,
    *,
    stop_ids: Iterable[int] = (),
    use_cache: bool = True,
    precision: Precision | None = None,
    generator: torch.Generator | None = None,
    min_new_tokens: int = 0,
) -> Iterator[int]:
    """Yield up to ``cfg.max_new_tokens`` new ids after ``prompt``; stop before any ``stop_ids``.

    ``stop_ids`` cannot be drawn as the first ``min_new_tokens`` ids (a chatbot's answer is never
    empty)."""
    if not prompt:
        raise ValueError("generation needs at least one prompt id")
    block = model.config.block_size
    stops = set(stop_ids)
    gen = generator if generator is not None else make_generator(cfg.seed)
    device = model.device
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    tokens = list(prompt)
    start = first_window(len(tokens), block)  # the window is tokens[start:]
    cache = KVCache(model.config) if use_cache else None
    for _ in range(cfg.max_new_tokens):
        slid = slid_window(len(tokens), start, block)
        if slid != start:  # the window slid: refill the cache from it
            start = slid
            if cache is not None:
                cache.reset()
        fed = start + (cache.pos if cache is not None else 0)  # ids already in the cache end here
        idx = torch.tensor([tokens[fed:]], dtype=torch.long, device=device)  # (1, T): T = 1 once filled
        with autocast:
            logits, _ = model(idx, cache=cache)  # (1, 1, V)
        last = logits[0, -1]
        if len(tokens) - len(prompt) < min_new_tokens and stops:
            last = last.index_fill(0, torch.tensor(sorted(stops), device=last.device), float("-inf"))
        # The window's ids matter only to the repetition penalty; skip building them otherwise.
        window = torch.tensor(tokens[start:] if cfg.repetition_penalty != 1.0 else [], dtype=torch.long)
        nxt = next_token(last, cfg, window, gen)
        if nxt in stops:
            return
        tokens.append(nxt)
        yield nxt


def stream_text(
    model: GPT,
    tokenizer: CharTokenizer,
    prompt: str | Sequence[int],
    cfg: SampleConfig,
    *,
    stop_strings: Sequence[str] = (),
    stop_ids: Iterable[int] = (EOT_ID,),
    precision: Precision | None = None,
    use_cache: bool = True,
    skip_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
    min_new_tokens: int = 0,
) -> Iterator[str]:
    """Yield the generated text piece by piece, ending before the first stop string or stop id.

    ``generate_ids`` feeding ``decode_stream``: see both for the rules.
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:  # an empty prompt starts from a line break, or the end of a turn
        ids = tokenizer.encode("\n") if "\n" in tokenizer.chars else [EOT_ID]
    new_ids = generate_ids(model, ids, cfg, stop_ids=stop_ids, use_cache=use_cache, precision=precision,
                           generator=generator, min_new_tokens=min_new_tokens)  # fmt: skip
    return decode_stream(new_ids, tokenizer, stop_strings=stop_strings, skip_ids=skip_ids)


def decode_stream(
    ids: Iterable[int],
    tokenizer: CharTokenizer,
    *,
    stop_strings: Sequence[str] = (),
    skip_ids: Iterable[int] = (),
) -> Iterator[str]:
    """Turn a stream of new ids into text pieces, ending before the first stop string.

    Text that might be the start of a stop string is held back until it is clear that it is not.
    Special tokens are shown by their spelling, except ``skip_ids`` (generated and kept in the
    context, but not shown). Stops as soon as a stop string is complete, without asking ``ids`` for
    more, so a generator behind ``ids`` does no extra work.
    """
    hidden = set(skip_ids)
    held = ""
    longest = max((len(s) for s in stop_strings), default=0)
    for i in ids:
        if i in hidden:
            continue
        held += tokenizer.decode([i])
        hits = [held.index(s) for s in stop_strings if s in held]
        if hits:
            if min(hits) > 0:
                yield held[: min(hits)]
            return
        # Everything except a tail that could still begin a stop string is safe to show.
        could_begin = (
            n for n in range(1, min(longest, len(held) + 1)) if _ends_with_prefix(held, stop_strings, n)
        )
        safe = len(held) - max(could_begin, default=0)
        if safe > 0:
            yield held[:safe]
            held = held[safe:]
    if held:
        yield held


def _ends_with_prefix(text: str, stops: Sequence[str], n: int) -> bool:
    """Whether the last ``n`` characters of ``text`` are the first ``n`` of some stop string."""
    return any(len(s) > n and text.endswith(s[:n]) for s in stops)
