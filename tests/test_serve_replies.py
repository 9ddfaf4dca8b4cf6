"""The text side of served answers (``minigpt2.serve.replies``): ids that are already drawn when a
choice's text thread reads them go out as one piece, so a busy server sends fewer, longer chunks
instead of falling behind one character at a time; pieces posted together are joined per choice.
Run with ``pytest tests/test_serve_replies.py``.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from helpers_serve import tiny_chatbot
from minigpt2.core.chat import Turn
from minigpt2.core.config import SampleConfig
from minigpt2.serve.engine import Job
from minigpt2.serve.replies import Reply, _joined


class Drawn:
    """Stands in for ``Engine``: a job's ids are all drawn (and its end posted) the moment it is
    submitted, before its text thread starts reading."""

    def __init__(self, ids: list[int]) -> None:
        self.ids, self.cancelled = ids, 0

    def submit(self, job: Job) -> None:
        for i in self.ids:
            job.feed.put(i)
        job.feed.put(None)

    def cancel(self, job: Job) -> None:
        self.cancelled += 1


def test_ids_already_drawn_go_out_as_one_piece_per_choice() -> None:
    bot = tiny_chatbot()
    drawn = Drawn(bot.tokenizer.encode("hello there"))
    engine: Any = drawn  # in the Engine's place

    async def read() -> list[tuple[int, str | None]]:
        with ThreadPoolExecutor(2) as threads:
            reply = Reply(bot, engine, threads, [Turn("user", "hi")], SampleConfig(max_new_tokens=40), n=2)
            return [piece async for piece in reply.pieces()]

    pieces = asyncio.run(read())
    for choice in (0, 1):
        assert [p for i, p in pieces if i == choice] == ["hello there", None]
    assert drawn.cancelled == 2  # each text thread hands its row back when its text ends


def test_joined_joins_each_choices_run_of_pieces_and_keeps_ends_in_place() -> None:
    err = RuntimeError("boom")
    items: list[tuple[int, str | BaseException | None]] = [
        (0, "a"), (1, "x"), (0, "b"), (0, None), (0, "late"), (1, "y"), (1, err), (2, "z"),
    ]  # fmt: skip
    assert _joined(items) == [(0, "ab"), (1, "xy"), (0, None), (0, "late"), (1, err), (2, "z")]
    assert _joined([]) == []
