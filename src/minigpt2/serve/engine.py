"""The decoding thread: every running answer advances together, one id each per batched model step.

Owns ``Engine``: one thread and the ``BatchDecoder`` (``minigpt2.fast.batch_decoder``) it alone touches (the
decoder is not thread-safe), and ``Job``, one row's generation as a request asks for it. Requests
post ``submit`` and ``cancel`` commands to a thread-safe queue; each turn of the loop applies the
cancels, adds waiting jobs up to the free rows (a new prompt is prefilled and joins the next step),
calls ``step()`` and puts each row's new id into its job's ``Feed`` (``feed``), which hands it to the
answer's coroutine on the event loop (``replies``). A row that finishes, or is cancelled (its client
left, or a stop string ended its text), leaves at once and its row goes to the next job. With no row
running, the thread sleeps on the queue. A step that fails fails the jobs in it and the loop goes on
with a fresh decoder.

Tests: ``pytest tests/serve/test_serve_batch.py`` (answers alone against among others, rows that leave,
failures) and ``tests/serve/test_serve_queue.py`` (the same through the whole server).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from minigpt2.core.config import SampleConfig
from minigpt2.fast.batch_decoder import Row
from minigpt2.serve.feed import Feed

log = logging.getLogger(__name__)


class Decoder(Protocol):
    """What the engine uses of ``BatchDecoder`` (tests put a scripted one in its place)."""

    @property
    def rows(self) -> list[Row]: ...

    @property
    def free(self) -> int: ...

    def add(self, prompt: Sequence[int], cfg: SampleConfig, *, stop_ids: Sequence[int] = (),
            min_new_tokens: int = 0, generator: torch.Generator | None = None) -> Row: ...  # fmt: skip

    def step(self) -> list[tuple[Row, int | None]]: ...

    def cancel(self, row: Row) -> None: ...


@dataclass(eq=False)
class Job:
    """One row's generation: the arguments of ``BatchDecoder.add``, and the feed its ids go to (made
    on the event loop that reads it)."""

    prompt: list[int]
    cfg: SampleConfig
    stop_ids: tuple[int, ...]
    min_new_tokens: int
    generator: torch.Generator
    feed: Feed = field(default_factory=Feed)
    row: Row | None = None  # the decoding thread's: set when the job joins the batch


_STOP = object()  # the command that ends the loop


class Engine:
    """One decoding thread over a decoder from ``make_decoder``; ``start`` it, ``submit`` jobs."""

    def __init__(self, make_decoder: Callable[[], Decoder]) -> None:
        self.make_decoder = make_decoder
        self.running = 0  # rows in the batch now (written by the decoding thread, read by /health)
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the decoding thread, unless it runs (or the engine was stopped). A thread that died
        of an error is replaced: the commands it left are the new one's."""
        with self._lock:
            if not self._stopped and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._run, name="minigpt2-decoding", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        """End the thread after its current step, for good; jobs still running or waiting fail."""
        with self._lock:
            self._stopped, thread = True, self._thread
        if thread is not None:
            self._commands.put(_STOP)
            thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue ``job``; its ids arrive in ``job.feed`` from the step after it joins the batch."""
        self.start()  # an app run without its lifespan (some test clients) starts it on first use
        if self._stopped:
            job.feed.put(RuntimeError("the server is shutting down"))
            return
        self._commands.put(("add", job))

    def cancel(self, job: Job) -> None:
        """Take ``job`` out (waiting or running) before the next step; nothing if it has ended."""
        self._commands.put(("cancel", job))

    def _run(self) -> None:
        waiting: deque[Job] = deque()
        jobs: dict[Row, Job] = {}  # the running rows' jobs
        ended: BaseException = RuntimeError("the server is shutting down")
        try:
            decoder = self.make_decoder()
            while self._take(decoder, waiting, jobs):
                self._join(decoder, waiting, jobs)
                self.running = len(decoder.rows)
                if decoder.rows:
                    decoder = self._step(decoder, jobs)
                    self.running = len(decoder.rows)
        except Exception as err:
            log.exception("the decoding thread failed")
            ended = err
        finally:
            self.running = 0
            while (command := _next(self._commands)) is not None:  # jobs posted too late for this thread
                if command is not _STOP and command[0] == "add":
                    waiting.append(command[1])
            for job in (*jobs.values(), *waiting):
                job.feed.put(ended)

    def _step(self, decoder: Decoder, jobs: dict[Row, Job]) -> Decoder:
        """One batched step, its ids delivered; the decoder to go on with."""
        try:
            events = decoder.step()
        except Exception as err:  # the batch is in an unknown state: fail its jobs, start afresh
            log.exception("a batched decoding step failed")
            for job in jobs.values():
                job.feed.put(err)
            jobs.clear()
            return self.make_decoder()
        for row, new_id in events:
            owner = jobs.get(row)
            if owner is None:
                continue
            if new_id is not None:
                owner.feed.put(new_id)
            if row.finished:  # its end, or the error that failed this row alone
                del jobs[row]
                owner.feed.put(row.error)
        return decoder

    def _take(self, decoder: Decoder, waiting: deque[Job], jobs: dict[Row, Job]) -> bool:
        """Apply every command posted since the last step, first waiting for one while no row runs.
        False once the loop is to stop."""
        commands = self._commands
        command = commands.get() if not decoder.rows and not waiting else _next(commands)
        while command is not None:
            if command is _STOP:
                return False
            kind, job = command
            if kind == "add":
                waiting.append(job)
            elif job.row is not None and jobs.pop(job.row, None) is not None:
                decoder.cancel(job.row)
                job.feed.put(None)
            elif job in waiting:
                waiting.remove(job)
                job.feed.put(None)
            command = _next(commands)
        return True

    def _join(self, decoder: Decoder, waiting: deque[Job], jobs: dict[Row, Job]) -> None:
        """Waiting jobs into free rows, oldest first: each prompt is prefilled now and drawn from at
        the next step."""
        while waiting and decoder.free:
            job = waiting.popleft()
            try:
                job.row = decoder.add(job.prompt, job.cfg, stop_ids=job.stop_ids,
                                      min_new_tokens=job.min_new_tokens, generator=job.generator)  # fmt: skip
            except Exception as err:  # this prompt's failure (e.g. out of memory) is its request's alone
                job.feed.put(err)
                continue
            jobs[job.row] = job


def _next(commands: queue.SimpleQueue[Any]) -> Any:
    try:
        return commands.get_nowait()
    except queue.Empty:
        return None
