"""An answer's text from its ids as they are drawn, one id at a time, on the event loop.

Owns ``AnswerText``: ``Chatbot.reply_text``'s rules (the template's stop strings and the request's,
text that could begin one held back until it is clear that it does not, ``<|unk|>`` drawn but not
shown, no spaces at either end, the ids counted and the finish reason) taking each id as it comes
rather than pulling the next one. ``reply_text`` is a generator that asks its ids for the next:
reading it without blocking the event loop would take a thread per answer, which this replaces.
Given the same ids, the two release the same text at the same id.

Tests: ``pytest tests/test_serve_replies.py`` (against ``Chatbot.reply_text`` on drawn ids) and
``tests/test_serve_batch.py`` (served answers against ``Chatbot.answer``).
"""

from __future__ import annotations

from collections.abc import Sequence

from minigpt2.core.chat import Chatbot, ReplyInfo
from minigpt2.core.tokenizer import UNK_ID


class AnswerText:
    """One answer's text: ``push`` each id as it is drawn, ``end`` when the row has left. ``info``
    counts the ids and says why the answer ended."""

    def __init__(self, bot: Chatbot, max_new_tokens: int, info: ReplyInfo,
                 stop_strings: Sequence[str] = ()) -> None:  # fmt: skip
        self._decode = bot.tokenizer.decode
        self._stops = (*bot.template.stop_strings, *(s for s in stop_strings if s))
        self._longest = max((len(s) for s in self._stops), default=0)
        self._max_new_tokens, self._info = max_new_tokens, info
        self._held = ""  # decoded text that could still begin a stop string
        self._started = False  # visible text has been shown (leading spaces are dropped before it)
        self._pending = ""  # spaces after the last visible text, shown only if more follows
        self.ended = False  # a stop string or the row's end ended the text: it takes no more ids
        info.finish_reason = "stop"

    def push(self, new_id: int) -> str:
        """The text that ``new_id`` makes safe to show ("" if none, and once the text has ended)."""
        if self.ended:
            return ""
        self._info.completion_tokens += 1
        if new_id == UNK_ID:
            return ""
        held = self._held + self._decode([new_id])
        hits = [held.index(s) for s in self._stops if s in held]
        if hits:  # the text ends before the stop string; ids after it are not counted
            self.ended = True
            return self._trimmed(held[: min(hits)])
        # Everything except a tail that could still begin a stop string is safe to show.
        could_begin = (n for n in range(1, min(self._longest, len(held) + 1)) if self._begins_stop(held, n))
        safe = len(held) - max(could_begin, default=0)
        self._held = held[safe:]
        return self._trimmed(held[:safe])

    def end(self) -> str:
        """The row has left (its stop id, its ``max_new_tokens``, or cancelled): the text held back."""
        if self.ended:
            return ""
        self.ended = True
        if self._info.completion_tokens >= self._max_new_tokens:  # it ran to the limit
            self._info.finish_reason = "length"
        return self._trimmed(self._held)

    def _begins_stop(self, text: str, n: int) -> bool:
        """Whether the last ``n`` characters of ``text`` are the first ``n`` of some stop string."""
        return any(len(s) > n and text.endswith(s[:n]) for s in self._stops)

    def _trimmed(self, piece: str) -> str:
        """``piece`` as shown: spaces at the answer's start dropped, those after its last visible
        character held back until something visible follows them."""
        if not self._started:
            piece = piece.lstrip()
            self._started = bool(piece)
        body = piece.rstrip()
        shown = self._pending + body if body else ""
        self._pending = "" if body else self._pending
        self._pending += piece[len(body) :]
        return shown
