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

import httpx
import pytest

from helpers_serve import running, tiny_chatbot
from minigpt2.cli.parser import build_parser
from minigpt2.core.chat import Turn
from minigpt2.core.config import SampleConfig
from minigpt2.errors import ConfigError
from minigpt2.serve import ServeConfig
from minigpt2.serve import app as app_module
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


def test_ids_already_drawn_go_out_as_one_chunk_per_choice() -> None:
    bot = tiny_chatbot()
    drawn = Drawn(bot.tokenizer.encode("hello there"))
    engine: Any = drawn  # in the Engine's place

    async def read() -> list[tuple[int, str | None]]:
        with ThreadPoolExecutor(2) as threads:
            history, sample = [Turn("user", "hi")], SampleConfig(max_new_tokens=40)
            reply = Reply(bot, engine, threads, history, sample, n=2, interval=10.0)
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
    """Pieces that arrive at given times, and the answer's end at ``end``, on a clock the test owns:
    reading a piece moves the clock to its arrival (if that is later); ``wait`` moves it on by the
    seconds, or less, to the end (as ``Feed.wait_end``: an id does not end the wait); ``waiting``
    says whether the next piece (or the end) has arrived by now. ``sent`` records each chunk with
    the time it went."""

    def __init__(self, arrivals: list[tuple[float, str]], end: float) -> None:
        self.arrivals, self.end, self.now = arrivals, end, 0.0
        self.sent: list[tuple[str, float]] = []

    def pieces(self) -> Iterator[str]:
        while self.arrivals:
            at, piece = self.arrivals.pop(0)
            self.now = max(self.now, at)
            yield piece
        self.now = max(self.now, self.end)

    def next_arrival(self) -> float:
        return self.arrivals[0][0] if self.arrivals else self.end

    def waiting(self) -> bool:
        return self.next_arrival() <= self.now

    def wait(self, seconds: float) -> None:
        self.now = min(self.now + seconds, max(self.now, self.end))

    def chunks(self, interval: float) -> list[tuple[str, float]]:
        for chunk in chunks(self.pieces(), self.waiting, interval, clock=lambda: self.now, wait=self.wait):
            self.sent.append((chunk, self.now))
        return self.sent


EVERY_10_MS = [(0.0, "a"), (0.01, "b"), (0.02, "c"), (0.03, "d"), (0.04, "e"), (0.1, "f")]


@pytest.mark.parametrize(
    ("interval", "expected"),
    [
        # the first at once; then one chunk at each due time, with what came meanwhile
        (0.025, [("a", 0.0), ("bc", 0.025), ("de", 0.05), ("f", 0.1)]),
        (0.0, [("a", 0.0), ("b", 0.01), ("c", 0.02), ("d", 0.03), ("e", 0.04), ("f", 0.1)]),
        # the rest as soon as the answer ends (at 0.1), not when the interval is up (at 1.0)
        (1.0, [("a", 0.0), ("bcdef", 0.1)]),
    ],
)
def test_chunks_go_at_most_once_an_interval_and_the_end_at_once(
    interval: float, expected: list[tuple[str, float]]
) -> None:
    assert Arrivals(list(EVERY_10_MS), end=0.1).chunks(interval) == expected


def test_pieces_already_here_go_in_one_chunk_without_waiting() -> None:
    times = Arrivals([(0.0, "a"), (0.0, "b"), (0.0, "c")], end=0.0)
    assert times.chunks(10.0) == [("abc", 0.0)]


def test_pieces_held_when_the_generation_fails_come_before_the_error() -> None:
    def failing() -> Iterator[str]:
        yield from "half"
        raise RuntimeError("the model fell over")

    out: list[str] = []
    with pytest.raises(RuntimeError, match="fell over"):
        for chunk in chunks(failing(), lambda: True, 10.0, wait=lambda _: None):
            out.append(chunk)
    assert out == ["half"]


def test_a_feed_wakes_its_reader_at_the_end_not_at_each_id() -> None:
    """``Feed.wait_end`` is the text thread's wait between chunks: an id does not end it (the
    thread decodes a chunk's ids together when the interval is up); the end, or an error, does."""
    for end in (None, RuntimeError("failed")):
        feed = Feed()
        waiter = threading.Thread(target=feed.wait_end, args=(3600,), daemon=True)
        waiter.start()
        feed.put(7)
        waiter.join(timeout=0.05)
        assert waiter.is_alive()  # an id came: still waiting
        assert feed.waiting()
        feed.put(end)
        waiter.join(timeout=60)
        assert not waiter.is_alive()
        feed.wait_end(3600)  # ended: returns at once
        assert next(feed) == 7


def test_stream_interval_defaults_agree_and_are_checked(
    cli: Run, one_line_error: OneLine, saved_run: Path
) -> None:
    args = build_parser().parse_args(["serve", "RUN"])
    assert args.stream_interval == ServeConfig().stream_interval > 0
    with pytest.raises(ConfigError, match="stream_interval"):
        ServeConfig(stream_interval=-0.01)
    line = one_line_error(cli("serve", saved_run, "--stream-interval", "5"))
    assert "stream_interval" in line


def test_the_server_streams_with_its_stream_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    intervals: list[float] = []

    class Recorded(Reply):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            intervals.append(self._interval)

    monkeypatch.setattr(app_module, "Reply", Recorded)
    with running(tiny_chatbot(), ServeConfig(stream_interval=0.3)) as base:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        assert httpx.post(base + "v1/chat/completions", json=body, timeout=30).status_code == 200
    assert intervals == [0.3]
