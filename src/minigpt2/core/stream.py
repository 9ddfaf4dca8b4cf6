"""The chatbot's generation: streams of ids and of text, with the rules a conversation needs.

``generate_ids`` is ``generate``'s loop (``core/generate.py``) with stop ids, a minimum answer
length, a repetition penalty and a window that slides past the context; ``stream_text`` adds the
tokenizer and stop strings (``StopStrings``). Both are generators, so callers print (or display)
each character as soon as it exists; nothing here prints. ``ReplyText`` is a chatbot answer's text
made one id at a time, with ``StopStrings`` and the rules of a turn (no spaces at either end,
``<|unk|>`` hidden, the ids counted in ``ReplyInfo``).

Past the context window the window slides: when it is full, generation keeps the newest
``block_size // 2`` ids and refills the KV cache from them, so long outputs cost one refill (a
forward pass over half a window) about every ``block_size // 2`` characters (keeping more of the
window keeps more context but refills more often: docs/performance.md). A prompt longer than the
window starts from its last ``block_size`` ids. The cache-free path (``use_cache=False``) slides the
window at the same points, so both give the same tokens.
Tests: ``pytest tests/core/test_generate.py tests/fast/test_decode.py tests/promises/test_properties.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from minigpt2.core.config import SampleConfig
from minigpt2.core.generate import apply_repetition_penalty, make_generator, sample
from minigpt2.core.model import GPT, KVCache
from minigpt2.core.precision import Precision
from minigpt2.core.tokenizer import EOT_ID, UNK_ID, CharTokenizer


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
    """Turn a stream of new ids into text pieces, ending before the first stop string
    (``StopStrings``). Special tokens are shown by their spelling, except ``skip_ids`` (generated
    and kept in the context, but not shown). Stops as soon as a stop string is complete, without
    asking ``ids`` for more, so a generator behind ``ids`` does no extra work.
    """
    hidden, stops = set(skip_ids), StopStrings(stop_strings)
    for i in ids:
        if i in hidden:
            continue
        piece = stops.push(tokenizer.decode([i]))
        if piece:
            yield piece
        if stops.ended:
            return
    rest = stops.flush()
    if rest:
        yield rest


class StopStrings:
    """Text arriving piece by piece, cut just before the first of ``stop_strings`` to appear.

    ``push`` returns what is safe to show: text that could still be the start of a stop string is
    held back until it cannot (a play's "\\n" may begin its "\\n\\n", and text once shown cannot be
    taken back). Once a stop string is complete, ``ended`` is true and nothing more is shown;
    ``flush`` gives what was held back when no more text comes.
    """

    def __init__(self, stop_strings: Sequence[str]) -> None:
        self.stop_strings = tuple(s for s in stop_strings if s)  # "" would end every text at once
        self._longest = max((len(s) for s in self.stop_strings), default=0)
        self._held = ""  # text that could still be the start of a stop string
        self.ended = False

    def push(self, text: str) -> str:
        if self.ended:
            return ""
        held = self._held + text
        # Shown text never ends with the start of a stop string, so a stop string lies within held.
        hits = [held.index(s) for s in self.stop_strings if s in held]
        if hits:
            self.ended, self._held = True, ""
            return held[: min(hits)]
        safe = len(held) - self._could_begin_a_stop(held)
        self._held = held[safe:]
        return held[:safe]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _could_begin_a_stop(self, text: str) -> int:
        """The length of the longest end of ``text`` that a stop string starts with (0: none)."""
        ends = range(1, min(self._longest, len(text) + 1))
        starts_a_stop = (
            n for n in ends if any(len(s) > n and text.endswith(s[:n]) for s in self.stop_strings)
        )
        return max(starts_a_stop, default=0)


@dataclass
class ReplyInfo:
    """Filled in while ``Chatbot.answer`` streams (what an API reports as usage and finish reason)."""

    prompt_tokens: int = 0  # ids fed to the model (after trimming to the context window)
    completion_tokens: int = 0  # ids generated, the stop id not counted
    finish_reason: str = "stop"  # "stop": the turn ended (or a stop string); "length": max_new_tokens


class ReplyText:
    """The text of one answer, made as its ids are drawn: ``push`` each id, then ``finish``.

    Each returns the text now safe to show, so one set of rules serves the caller that pulls ids
    from a generator (``Chatbot.reply_text``) and the one handed them as they come (the server):
    - the answer ends just before the first stop string, not shown; then ``ended`` is true;
    - text that could begin a stop string is held back until it cannot (a play's "\\n" may be the
      start of its "\\n\\n", and text once shown cannot be taken back);
    - ``<|unk|>`` is counted but not shown (the model may draw it; it stands for no character);
    - no spaces or line breaks at either end (trailing ones wait for something visible to follow),
      so the text streamed is the text a history keeps.
    ``info`` counts the ids, up to the one that completes a stop string, and says why the answer
    ended: "stop" (a stop id or stop string) or "length" (it ran to ``max_new_tokens``).
    """

    def __init__(self, tokenizer: CharTokenizer, stop_strings: Sequence[str], max_new_tokens: int,
                 info: ReplyInfo) -> None:  # fmt: skip
        self._decode = tokenizer.decode
        self._stops = StopStrings(stop_strings)
        self.stop_strings = self._stops.stop_strings
        self._max_new_tokens, self.info = max_new_tokens, info
        self._started = False  # something visible has been shown: spaces are no longer leading
        self._spaces = ""  # spaces after the last visible text: shown only if more text follows
        self.ended = False  # a stop string or ``finish`` ended the answer: later ids are ignored
        info.finish_reason = "stop"

    def push(self, new_id: int) -> str:
        """The text that ``new_id`` makes safe to show: "" if none, and always once ``ended``."""
        if self.ended:
            return ""
        self.info.completion_tokens += 1
        if new_id == UNK_ID:
            return ""
        piece = self._stops.push(self._decode([new_id]))
        self.ended = self._stops.ended
        return self._shown(piece)

    def finish(self) -> str:
        """No more ids come (a stop id, ``max_new_tokens``, or the caller stopped): the text held
        back, which no stop string can follow now, and ``info``'s finish reason."""
        if self.ended:
            return ""
        self.ended = True
        if self.info.completion_tokens >= self._max_new_tokens:  # cut off, not its choice to end
            self.info.finish_reason = "length"
        return self._shown(self._stops.flush())

    def _shown(self, piece: str) -> str:
        """What of ``piece`` to show, given the spaces rule: "" while it holds only spaces."""
        if not self._started:
            piece = piece.lstrip()
            self._started = bool(piece)
        body = piece.rstrip()
        if not body:
            self._spaces += piece
            return ""
        shown, self._spaces = self._spaces + body, piece[len(body) :]
        return shown
