"""The hand-off of one row's ids from the decoding thread to the event loop.

Owns ``Feed``: the decoding thread ``put``s each id a row draws, then the row's end (None) or the
error that ended it; the answer's coroutine, on the event loop, ``take``s what has come and
``wait``s for more. Nothing blocks either side: ``put`` appends to a deque and, when the reader
wants waking, hands one ``call_soon_threadsafe`` to the loop. The reader says what wakes it: the
next id (while it has no text to send), or only the end once it holds text until its next chunk is
due, so a streamed answer wakes once a chunk, not once an id (waking a reader for each of 20 rows
at every step cost the server 6-46% of its characters/s when each reader was a thread:
docs/performance.md, section 8).

Tests: ``pytest tests/serve/test_serve_replies.py`` (a real thread putting ids while the loop waits) and
``tests/serve/test_serve_batch.py`` (the same through the whole server).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

Item = int | BaseException | None  # an id; None: the row has ended; an exception: it failed


class Feed:
    """One row's ids, from the thread that draws them to the coroutine that reads them. Made on the
    event loop that reads it (or given that loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        # deque's append and popleft are atomic: the decoding thread appends, the loop pops.
        self._items: deque[Item] = deque()
        self._ended = False  # the end or an error is in the deque (the decoding thread sets it)
        self._eager = False  # the reader waits for the next id, not only for the end
        self._called = False  # a wake-up is on its way to the loop: no need for another
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: Item) -> None:
        """An id, the end (None) or the error that ended the row; from any thread. Anything after
        the end is dropped by the reader."""
        self._items.append(item)
        if isinstance(item, int) and not self._eager:
            return  # the reader holds text until its chunk is due: this id can wait for it
        if not isinstance(item, int):
            self._ended = True
        if not self._called:
            self._called = True
            # RuntimeError: the event loop has closed (the server stopped), so nobody is reading.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._called = False  # first: a put from now on calls again
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def take(self) -> list[Item]:
        """Everything put since the last ``take``, oldest first."""
        return [self._items.popleft() for _ in range(len(self._items))]

    async def wait(self, until: float | None = None) -> None:
        """Returns once something has been put that is not yet taken; with ``until`` (a time on the
        loop's clock), once the end or an error has been put, or at ``until``, whichever is first:
        an id does not end that wait."""
        self._eager = until is None  # set before looking: a put after the look sees it
        try:
            if (self._items if self._eager else self._ended) or (
                until is not None and until <= self._loop.time()
            ):
                return
            # No await between the look and the wait: a wake-up called meanwhile finds the waiter.
            self._waiter = self._loop.create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(until):
                    await self._waiter
        finally:
            self._waiter, self._eager = None, False
