"""The text side of served answers (``minigpt2.serve.replies``): how a streamed answer is cut into
chunks. The first piece goes at once; after each chunk the next waits ``stream_interval`` (what is
generated meanwhile joins it), except that pieces already drawn go together and an answer's end
does not wait; pieces posted together are joined per choice. The clock is the test's own: nothing
here depends on how long anything takes. Run with ``pytest tests/test_serve_replies.py``.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from helpers_serve import tiny_chatbot
from minigpt2.cli.parser import build_parser
from minigpt2.core.chat import Turn
from minigpt2.core.config import SampleConfig
from minigpt2.errors import ConfigError
from minigpt2.serve import ServeConfig
from minigpt2.serve.engine import Feed, Job
from minigpt2.serve.replies import Reply, _joined, chunks

Run = Callable[..., subprocess.CompletedProcess[str]]
OneLine = Callable[[subprocess.CompletedProcess[str]], str]


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


class Arrivals:
    """Pieces that arrive at given times on a clock the test owns: reading one moves the clock to
    its arrival (if that is later), ``sleep`` moves it on, ``waiting`` says whether the next piece
    has arrived by now."""

    def __init__(self, arrivals: list[tuple[float, str]]) -> None:
        self.arrivals, self.now = arrivals, 0.0

    def pieces(self) -> Iterator[str]:
        while self.arrivals:
            at, piece = self.arrivals.pop(0)
            self.now = max(self.now, at)
            yield piece

    def waiting(self) -> bool:
        return bool(self.arrivals) and self.arrivals[0][0] <= self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize(
    ("interval", "expected"),
    [
        (0.025, ["a", "bc", "de", "f"]),  # the first at once; then at most one chunk per 25 ms
        (0.0, ["a", "b", "c", "d", "e", "f"]),  # each piece as it comes
        (1.0, ["a", "bcdef"]),  # the rest after a second (an answer's end does not wait: see below)
    ],
)
def test_chunks_hold_pieces_for_the_interval_after_each_chunk(interval: float, expected: list[str]) -> None:
    times = Arrivals([(0.0, "a"), (0.01, "b"), (0.02, "c"), (0.03, "d"), (0.04, "e"), (0.1, "f")])
    got = list(chunks(times.pieces(), times.waiting, interval, clock=lambda: times.now, sleep=times.sleep))
    assert got == expected


def test_pieces_already_here_go_in_one_chunk_without_waiting() -> None:
    times = Arrivals([(0.0, "a"), (0.0, "b"), (0.0, "c")])
    slept: list[float] = []
    got = list(chunks(times.pieces(), times.waiting, 10.0, clock=lambda: times.now, sleep=slept.append))
    assert got == ["abc"] and slept == []


def test_pieces_held_when_the_generation_fails_come_before_the_error() -> None:
    def failing() -> Iterator[str]:
        yield from "half"
        raise RuntimeError("the model fell over")

    out: list[str] = []
    with pytest.raises(RuntimeError, match="fell over"):
        for chunk in chunks(failing(), lambda: True, 10.0, sleep=lambda _: None):
            out.append(chunk)
    assert out == ["half"]


def test_the_wait_between_chunks_ends_when_the_answer_does() -> None:
    """``Feed.wait_end`` is the text thread's sleep: an answer's last chunk is not held back."""
    feed = Feed()
    feed.put(7)
    waiter = threading.Thread(target=feed.wait_end, args=(3600,), daemon=True)
    waiter.start()
    feed.put(None)
    waiter.join(timeout=60)
    assert not waiter.is_alive()
    assert list(feed) == [7]


def test_stream_interval_defaults_agree_and_are_checked(
    cli: Run, one_line_error: OneLine, saved_run: Path
) -> None:
    args = build_parser().parse_args(["serve", "RUN"])
    assert args.stream_interval == ServeConfig().stream_interval > 0
    with pytest.raises(ConfigError, match="stream_interval"):
        ServeConfig(stream_interval=-0.01)
    line = one_line_error(cli("serve", saved_run, "--stream-interval", "5"))
    assert "stream_interval" in line
