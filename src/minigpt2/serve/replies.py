"""The text of answers: one request's choices, each a row of the engine read by a coroutine.

Owns ``Reply``: a request's ``n`` answers to one prompt (OpenAI's ``n``). The prompt is built once
(``Chatbot.prepare``); each choice is a ``Job`` for the decoding thread (``engine``) with its own
generator (seed, seed + 1, ... when the request gives a seed), and its text is the chatbot's
``ReplyText`` (``Chatbot.new_reply_text``: the stop strings, trimming and counting of
``Chatbot.answer``), handed each id as it comes from the job's ``Feed`` (``feed``: the hand-off from
the decoding thread). Each choice's text is made by a task of its own on the event loop
(``_write``), which sends it in ``chunks``: the first piece at once, then what is generated within
the server's ``stream_interval`` together (a chunk costs the server and its client far more than a
character), the task sleeping between chunks. The tasks run whether or not the endpoint is reading,
so a stop string frees its row within one interval even while a slow client is still being sent what
came before. ``pieces`` gives the chunks to the endpoint as they come (joining a choice's chunks
that arrived together), ``whole`` all at the end. ``close`` (the client went away, or the answer was
sent) cancels every row and every task, so nothing is left generating for nobody.

Tests: ``pytest tests/serve/test_serve_batch.py`` (choices, seeds, stop strings, rows that leave) and
``tests/serve/test_serve_replies.py`` (chunks, the hand-off, the text).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

import anyio

from minigpt2.core.chat import Chatbot, Turn
from minigpt2.core.config import SampleConfig
from minigpt2.core.generate import make_generator
from minigpt2.core.stream import ReplyInfo, ReplyText
from minigpt2.serve.engine import Engine, Job
from minigpt2.serve.feed import Item

SEEDS = 2**63  # a request's seed is below this; choice i is seeded (seed + i) modulo it


class Reply:
    """``n`` answers to ``history``, started at once; read them with ``pieces``, then ``close``.
    Made on the event loop that will read it."""

    def __init__(self, bot: Chatbot, engine: Engine, history: Sequence[Turn], sample: SampleConfig,
                 stop_strings: Sequence[str] = (), n: int = 1, interval: float = 0.0) -> None:  # fmt: skip
        prompt, stop_ids, min_new_tokens = bot.prepare(history)
        self._engine, self._interval = engine, interval
        self._queue: asyncio.Queue[tuple[int, str | BaseException | None]] = asyncio.Queue()
        self._left = n  # choices not yet ended
        self.infos = [ReplyInfo(prompt_tokens=len(prompt)) for _ in range(n)]
        seeds = [None if sample.seed is None else (sample.seed + i) % SEEDS for i in range(n)]
        self.jobs = [Job(prompt, sample, stop_ids, min_new_tokens, make_generator(s)) for s in seeds]
        self._writers: list[asyncio.Task[None]] = []
        for index, (job, info) in enumerate(zip(self.jobs, self.infos, strict=True)):
            text = bot.new_reply_text(sample.max_new_tokens, info, stop_strings)
            engine.submit(job)
            self._writers.append(asyncio.create_task(self._write(index, job, text)))

    async def _write(self, index: int, job: Job, text: ReplyText) -> None:
        """One choice's chunks (``chunks``) to ``pieces``, then its end (None) or the error that
        ended it."""
        try:
            async for chunk in chunks(job.feed, text, self._interval, asyncio.get_running_loop().time):
                self._queue.put_nowait((index, chunk))
            self._queue.put_nowait((index, None))
        except Exception as err:  # the generation failed: the endpoint reports it
            self._queue.put_nowait((index, err))
        finally:
            self._engine.cancel(job)  # a stop string ends the text before the row: free the row now

    async def pieces(self) -> AsyncIterator[tuple[int, str | None]]:
        """(choice, piece) as each piece comes, and (choice, None) once that choice has ended (its
        ``infos`` entry is then final). Raises the error that ended a choice, if one did."""
        while self._left:
            items = [await self._queue.get()]
            while not self._queue.empty():  # everything posted meanwhile: one chunk per choice
                items.append(self._queue.get_nowait())
            for index, item in _joined(items):
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    self._left -= 1
                yield index, item

    async def whole(self, gone: Callable[[], Awaitable[None]]) -> list[str]:
        """Each choice's whole text; cut short once ``gone`` returns (the client left, so nobody is
        waiting for the rest)."""
        texts: list[list[str]] = [[] for _ in self.infos]
        failure: Exception | None = None
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                await gone()
                group.cancel_scope.cancel()

            group.start_soon(watch)
            try:
                async for index, piece in self.pieces():
                    if piece is not None:
                        texts[index].append(piece)
            except Exception as err:  # raised as itself below, not inside the task group's ExceptionGroup
                failure = err
            group.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return ["".join(text) for text in texts]

    def close(self) -> None:
        """Stop every choice still running (safe to call more than once, and after they ended): their
        rows leave before the next step, and their tasks end at once."""
        for job in self.jobs:
            self._engine.cancel(job)
        for writer in self._writers:
            writer.cancel()

    def usage(self) -> dict[str, int]:
        """OpenAI's token counts (characters here): the prompt once, the answers' ids summed."""
        prompt = self.infos[0].prompt_tokens
        completion = sum(info.completion_tokens for info in self.infos)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Source(Protocol):
    """What ``chunks`` reads from: a ``Feed`` (tests give one on a clock of their own)."""

    def take(self) -> list[Item]: ...

    async def wait(self, until: float | None = None) -> None: ...


async def chunks(
    feed: Source, text: ReplyText, interval: float, clock: Callable[[], float]
) -> AsyncIterator[str]:
    """The text of ``feed``'s ids in chunks: the first goes at once, each next one ``interval``
    seconds or more after the last (on ``clock``, the one ``feed.wait`` counts on), with the text
    of every id that came meanwhile; the answer's end goes at once. While it holds text it waits
    for its chunk's time or the end, not for each id: the ids drawn meanwhile are decoded together
    when it wakes, so a stop string among them ends the text (and frees its row) within one
    interval. So a stream costs the server one chunk and one wake-up of its task per interval, not
    one per character, and its client one chunk (0: each piece as it comes). An error that ended the
    row is raised after the text that came before it."""
    held, due = "", clock()  # the text not yet sent; when the next chunk may go
    failure: BaseException | None = None
    over = False
    while not over:
        holding = bool(held)
        await feed.wait(due if holding else None)  # holding: returns at ``due`` or the end
        for item in feed.take():
            if isinstance(item, int):
                held += text.push(item)
                over = text.ended  # a stop string: the ids after it are not wanted
            elif item is None:
                held, over = held + text.finish(), True
            else:
                failure, over = item, True
            if over:
                break
        if held and (over or holding or clock() >= due):
            yield held
            held, due = "", clock() + interval
    if failure is not None:
        raise failure


def _joined(
    items: list[tuple[int, str | BaseException | None]],
) -> list[tuple[int, str | BaseException | None]]:
    """``items`` with each run of one choice's pieces joined into one piece, at the run's first
    place (a run ends at that choice's end or error, which come after it): each choice's items keep
    their order, as do the runs, ends and errors by their first item."""
    out: list[tuple[int, str | BaseException | None]] = []
    last: dict[int, int] = {}  # choice -> where its open run of text is in out
    for index, item in items:
        if isinstance(item, str) and index in last:
            at = last[index]
            out[at] = (index, str(out[at][1]) + item)
            continue
        last.pop(index, None)
        if isinstance(item, str):
            last[index] = len(out)
        out.append((index, item))
    return out
