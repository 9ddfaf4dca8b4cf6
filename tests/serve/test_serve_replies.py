"""The text side of served answers: the hand-off from the decoding thread (``minigpt2.serve.feed``)
and how a streamed answer is cut into chunks (``serve.replies``), its text made by the chatbot's
``ReplyText`` (tested on its own in ``tests/promises/test_properties.py``). The first chunk goes at once;
after each chunk the next waits ``stream_interval`` (what is generated meanwhile joins it), except
that ids already drawn go together and an answer's end does not wait; pieces posted together are
joined per choice. A ``Feed`` wakes its reader from another thread at the next id, or only at the
end while the reader holds text. The chunk tests run on a clock of their own, and the hand-off
tests wait for events under generous deadlines: nothing here depends on how long anything takes.
Run with ``pytest tests/serve/test_serve_replies.py``.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers_serve import running, tiny_chatbot
from minigpt2 import serve
from minigpt2.cli.parser import build_parser
from minigpt2.core.chat import Turn
from minigpt2.core.config import SampleConfig
from minigpt2.core.stream import ReplyInfo
from minigpt2.errors import ConfigError
from minigpt2.serve import ServeConfig
from minigpt2.serve import app as app_module
from minigpt2.serve.engine import Job
from minigpt2.serve.feed import Feed, Item
from minigpt2.serve.replies import Reply, _joined, chunks

Run = Callable[..., subprocess.CompletedProcess[str]]
OneLine = Callable[[subprocess.CompletedProcess[str]], str]
DEADLINE = 60  # seconds: for a broken hand-off, not a guess at how long a working one takes


class Drawn:
    """Stands in for ``Engine``: a job's ids are all drawn (and its end posted) the moment it is
    submitted, before its task starts reading."""

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
        history, sample = [Turn("user", "hi")], SampleConfig(max_new_tokens=40)
        reply = Reply(bot, engine, history, sample, n=2, interval=10.0)
        return [piece async for piece in reply.pieces()]

    pieces = asyncio.run(read())
    for choice in (0, 1):
        assert [p for i, p in pieces if i == choice] == ["hello there", None]
    assert drawn.cancelled == 2  # each choice's task hands its row back when its text ends


def test_joined_joins_each_choices_run_of_pieces_and_keeps_ends_in_place() -> None:
    err = RuntimeError("boom")
    items: list[tuple[int, str | BaseException | None]] = [
        (0, "a"), (1, "x"), (0, "b"), (0, None), (0, "late"), (1, "y"), (1, err), (2, "z"),
    ]  # fmt: skip
    assert _joined(items) == [(0, "ab"), (1, "xy"), (0, None), (0, "late"), (1, err), (2, "z")]
    assert _joined([]) == []


class Arrivals:
    """A feed whose ids arrive at given times, and the answer's end at ``end``, on a clock the
    test owns: ``wait`` moves the clock to the next arrival (the end, too), or with ``until`` to
    ``until`` or the end, whichever is first (as ``Feed.wait``: an id does not end that wait);
    ``take`` hands over what has arrived by now. ``sent`` records each chunk with the time it went."""

    def __init__(self, arrivals: list[tuple[float, str]], end: float) -> None:
        self.bot = tiny_chatbot()
        encode = self.bot.tokenizer.encode
        self.arrivals = [(at, i) for at, piece in arrivals for i in encode(piece)]
        self.end, self.now, self.ended = end, 0.0, False
        self.sent: list[tuple[str, float]] = []

    def next_arrival(self) -> float:
        return self.arrivals[0][0] if self.arrivals else self.end

    async def wait(self, until: float | None = None) -> None:
        self.now = max(self.now, self.next_arrival() if until is None else min(until, self.end))

    def take(self) -> list[Item]:
        items: list[Item] = []
        while self.arrivals and self.arrivals[0][0] <= self.now:
            items.append(self.arrivals.pop(0)[1])
        if not self.arrivals and self.end <= self.now and not self.ended:
            self.ended = True
            items.append(None)
        return items

    def chunks(self, interval: float) -> list[tuple[str, float]]:
        text = self.bot.new_reply_text(100, ReplyInfo())

        async def read() -> None:
            async for chunk in chunks(self, text, interval, clock=lambda: self.now):
                self.sent.append((chunk, self.now))

        asyncio.run(read())
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


def test_ids_already_here_go_in_one_chunk_without_waiting() -> None:
    times = Arrivals([(0.0, "a"), (0.0, "b"), (0.0, "c")], end=0.0)
    assert times.chunks(10.0) == [("abc", 0.0)]


def test_text_held_when_the_generation_fails_comes_before_the_error() -> None:
    bot = tiny_chatbot()

    class Failing:
        def take(self) -> list[Item]:
            return [*bot.tokenizer.encode("half"), RuntimeError("the model fell over"), 7]

        async def wait(self, until: float | None = None) -> None:
            pass

    out: list[str] = []

    async def keep() -> None:
        text = bot.new_reply_text(100, ReplyInfo())
        async for chunk in chunks(Failing(), text, 10.0, clock=lambda: 0.0):
            out.append(chunk)

    with pytest.raises(RuntimeError, match="fell over"):
        asyncio.run(keep())
    assert out == ["half"]


def put_from_a_thread(feed: Feed, *items: Item) -> None:
    """``items`` put by another thread, as the decoding thread puts them; returns once they are."""
    thread = threading.Thread(target=lambda: [feed.put(item) for item in items])
    thread.start()
    thread.join(DEADLINE)
    assert not thread.is_alive()


async def turns_of_the_loop(count: int = 5) -> None:
    """Lets the loop run what other threads handed it: a wake-up is one turn, its reader the next."""
    for _ in range(count):
        await asyncio.sleep(0)


@pytest.mark.parametrize("end", [None, RuntimeError("failed")], ids=["end", "error"])
def test_a_feed_wakes_a_reader_holding_text_at_the_end_not_at_an_id(end: Item) -> None:
    async def scenario() -> None:
        feed = Feed()
        loop = asyncio.get_running_loop()
        waiter = asyncio.create_task(feed.wait(until=loop.time() + 3600))
        await turns_of_the_loop()
        put_from_a_thread(feed, 7)
        await turns_of_the_loop()
        assert not waiter.done()  # an id came: still waiting
        put_from_a_thread(feed, end)
        await asyncio.wait_for(waiter, DEADLINE)
        assert feed.take() == [7, end]
        await asyncio.wait_for(feed.wait(until=loop.time() + 3600), DEADLINE)  # ended: at once

    asyncio.run(scenario())


def test_a_feed_wakes_a_reader_without_text_at_each_id_and_loses_none() -> None:
    """Another thread puts 5,000 ids as fast as it can while the reader waits for each next one:
    every id arrives, in order, and no wake-up is lost (a lost one would leave the reader waiting
    past the deadline)."""
    count = 5000

    async def scenario() -> list[Item]:
        feed = Feed()
        thread = threading.Thread(target=lambda: [feed.put(i) for i in [*range(count), None]])
        got: list[Item] = []
        thread.start()
        while None not in got:
            await asyncio.wait_for(feed.wait(), DEADLINE)
            got += feed.take()
        thread.join(DEADLINE)
        return got

    assert asyncio.run(scenario()) == [*range(count), None]


def test_serve_without_options_runs_with_the_servers_defaults(
    cli: Run, one_line_error: OneLine, saved_run: Path
) -> None:
    """``minigpt2 serve`` with no options builds the limits ``ServeConfig`` has by default (the
    command builds them from these arguments), and says so in its help; values out of range are
    refused with one line."""
    args = build_parser().parse_args(["serve", "RUN"])
    given = {name: getattr(args, name) for name in (*serve.LIMITS, *serve.CONNECTION_LIMITS)}
    limits = ServeConfig(
        **given, default_max_tokens=args.max_new_tokens, stream_interval=args.stream_interval
    )
    assert limits == ServeConfig() and limits.stream_interval > 0
    assert f"(default {ServeConfig().stream_interval:g};" in " ".join(build_parser_help("serve").split())
    with pytest.raises(ConfigError, match="stream_interval"):
        ServeConfig(stream_interval=-0.01)
    line = one_line_error(cli("serve", saved_run, "--stream-interval", "5"))
    assert "stream_interval" in line


def build_parser_help(command: str) -> str:
    """The help of one command, as ``minigpt2 COMMAND --help`` prints it."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return str(sub.choices[command].format_help())  # type: ignore[attr-defined]


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
