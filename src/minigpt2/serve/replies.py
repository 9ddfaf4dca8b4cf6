"""The text of answers: one request's choices, each a row of the engine read by a text thread.

Owns ``Reply``: a request's ``n`` answers to one prompt (OpenAI's ``n``). The prompt is built once
(``Chatbot.prepare``); each choice is a ``Job`` for the decoding thread (``engine``) with its own
generator (seed, seed + 1, ... when the request gives a seed), and its text is ``Chatbot.reply_text``
over the job's ``Feed``: the chatbot's own stop strings, trimming and counting, as ``Chatbot.answer``
has them. ``reply_text`` pulls ids and the feed blocks until the next one is drawn, so each choice's
text runs in a thread of its own (``threads``, one per row), which hands its text to the event loop
in ``chunks``: the first piece at once, then what is generated within the server's
``stream_interval`` together (a chunk costs the server and its client far more than a character),
the thread sleeping between chunks. ``pieces`` gives them to the endpoint as they come (joining a
choice's chunks that arrived together), ``whole`` all at the end. A choice whose text ends early (a
stop string) cancels its row as soon as its thread reads it (within one interval); ``close`` (the
client went away) cancels every row and wakes every text thread, so nothing is left generating for
nobody.

Tests: ``pytest tests/test_serve_batch.py`` (choices, seeds, stop strings, rows that leave) and
``tests/test_serve_replies.py`` (chunks).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor

import anyio

from minigpt2.core.chat import Chatbot, ReplyInfo, Turn
from minigpt2.core.config import SampleConfig
from minigpt2.core.generate import make_generator
from minigpt2.serve.engine import Engine, Job

SEEDS = 2**63  # a request's seed is below this; choice i is seeded (seed + i) modulo it


class Reply:
    """``n`` answers to ``history``, started at once; read them with ``pieces``, then ``close``.
    Made on the event loop that will read it."""

    def __init__(self, bot: Chatbot, engine: Engine, threads: Executor, history: Sequence[Turn],
                 sample: SampleConfig, stop_strings: Sequence[str] = (), n: int = 1,
                 interval: float = 0.0) -> None:  # fmt: skip
        prompt, stop_ids, min_new_tokens = bot.prepare(history)
        self._engine, self._loop, self._interval = engine, asyncio.get_running_loop(), interval
        self._queue: asyncio.Queue[tuple[int, str | BaseException | None]] = asyncio.Queue()
        self._left = n  # choices not yet ended
        self.infos = [ReplyInfo(prompt_tokens=len(prompt)) for _ in range(n)]
        seeds = [None if sample.seed is None else (sample.seed + i) % SEEDS for i in range(n)]
        self.jobs = [Job(prompt, sample, stop_ids, min_new_tokens, make_generator(s)) for s in seeds]
        for index, (job, info) in enumerate(zip(self.jobs, self.infos, strict=True)):
            text = bot.reply_text(job.feed, sample.max_new_tokens, info, stop_strings)
            engine.submit(job)
            threads.submit(self._write, index, job, text)

    def _write(self, index: int, job: Job, text: Iterator[str]) -> None:
        """A text thread: one choice's chunks to the event loop (``chunks``), then its end (None) or
        the error that ended it."""
        try:
            for chunk in chunks(text, job.feed.waiting, self._interval, wait=job.feed.wait_end):
                self._post(index, chunk)
            self._post(index, None)
        except Exception as err:
            self._post(index, err)
        finally:
            self._engine.cancel(job)  # a stop string ends the text before the row: free the row now

    def _post(self, index: int, item: str | BaseException | None) -> None:
        # RuntimeError: the event loop has closed (the server stopped), so nobody is reading.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, item))

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
        rows leave before the next step, and their text threads stop waiting at once."""
        for job in self.jobs:
            self._engine.cancel(job)
            job.feed.put(None)

    def usage(self) -> dict[str, int]:
        """OpenAI's token counts (characters here): the prompt once, the answers' ids summed."""
        prompt = self.infos[0].prompt_tokens
        completion = sum(info.completion_tokens for info in self.infos)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chunks(
    pieces: Iterable[str],
    waiting: Callable[[], bool],
    interval: float,
    clock: Callable[[], float] = time.monotonic,
    wait: Callable[[float], None] = time.sleep,
) -> Iterator[str]:
    """``pieces`` joined into chunks: the first goes at once, each next one ``interval`` seconds or
    more after the last, with every piece that came meanwhile. ``waiting()`` says whether the next
    piece's id is already here (it joins the chunk first, for at most one more interval);
    ``wait(seconds)`` returns when the seconds are up or, earlier, when the ids end, so an answer's
    end is sent at once. The ids drawn during a wait are decoded after it, together: a stop string
    among them ends the text (and frees its row) within one interval. So a stream costs the server
    one chunk and one wake-up of its text thread per interval, not one per character, and its
    client one chunk (0: each piece as it comes)."""
    held: list[str] = []
    due = clock()  # when the next chunk may go
    try:
        for piece in pieces:
            held.append(piece)
            now = clock()
            if waiting() and now < due + interval:
                continue  # the next piece is already here: it goes in this chunk
            if now < due:
                wait(due - now)
                if waiting():  # what was drawn meanwhile (or the end) joins this chunk first
                    continue
            yield "".join(held)
            held.clear()
            due = clock() + interval
    except Exception:  # the generation failed: what was said before it is still shown
        if held:
            yield "".join(held)
        raise
    if held:
        yield "".join(held)


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
