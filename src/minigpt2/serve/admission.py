"""Admission control: how much work the server takes on, and how it lets go of it.

Owns ``Gate`` (at most ``slots`` rows of the batch in use, a request taking one per choice; up to
``max_queue`` more requests waiting, in order, the rest refused with 429; a client that leaves the
queue gives up its place), ``SlotResponse`` (a server-sent-event stream that frees its slots however
it ends) and ``BodyLimit`` (ASGI middleware: bodies over ``max_body_bytes`` get 413 before they are
read whole).

Tests: ``pytest tests/serve/test_serve_queue.py`` (the load, queue, 429 and disconnect cases) and
``tests/serve/test_serve.py`` (body sizes).
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from fastapi import HTTPException
from fastapi.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from minigpt2.serve.schema import ApiError


class ClientGoneError(Exception):
    """The client disconnected while its request waited for a slot."""


class Gate:
    """At most ``slots`` slots in use (a request takes ``need``, one per row it will run); up to
    ``queue`` more requests wait, first come first served, and later ones get 429."""

    def __init__(self, slots: int, queue: int) -> None:
        self.slots, self.queue = slots, queue
        self.active = 0  # requests holding slots
        self.busy = 0  # slots they hold
        # The waiting requests, oldest first: (slots needed, set once they are theirs). Every change
        # happens between awaits, so a burst of requests arriving together cannot slip past a limit.
        self._waiters: deque[tuple[int, anyio.Event]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def enter(
        self, gone: Callable[[], Awaitable[bool]] | None = None, need: int = 1
    ) -> Callable[[], None]:
        """Wait for ``need`` slots (at most ``slots``); returns the function that frees them (safe to
        call more than once). ``gone`` is polled while waiting: a client that has left gives up its
        place in the queue."""
        if not 1 <= need <= self.slots:
            raise ValueError(f"need must be in [1, {self.slots}], got {need}")
        if self._waiters or self.busy + need > self.slots:
            if len(self._waiters) >= self.queue:
                raise ApiError(429, f"the server is busy ({self.active} requests running, {self.waiting} "
                               "waiting); try again shortly", code="server_busy")  # fmt: skip
            waiter = (need, anyio.Event())
            self._waiters.append(waiter)
            try:
                await self._wait(waiter[1], gone)
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                    self._grant()  # the next in line may fit now
                else:  # the slots were handed over as it gave up: pass them on
                    self._release(need)
                raise
        else:
            self._take(need)
        freed = False

        def leave() -> None:
            nonlocal freed
            if not freed:
                freed = True
                self._release(need)

        return leave

    def _take(self, need: int) -> None:
        self.active += 1
        self.busy += need

    def _release(self, need: int) -> None:
        self.active -= 1
        self.busy -= need
        self._grant()

    def _grant(self) -> None:
        """Hand free slots to the waiting requests, oldest first, while the oldest fits."""
        while self._waiters and self.busy + self._waiters[0][0] <= self.slots:
            need, event = self._waiters.popleft()
            self._take(need)
            event.set()

    @staticmethod
    async def _wait(event: anyio.Event, gone: Callable[[], Awaitable[bool]] | None) -> None:
        while not event.is_set():
            with anyio.move_on_after(0.2 if gone is not None else None):
                await event.wait()
            if not event.is_set() and gone is not None and await gone():
                raise ClientGoneError


class SlotResponse(StreamingResponse):
    """A streaming response that frees its generation slot and closes its stream however it ends
    (finished, client gone, server shutting down)."""

    def __init__(self, stream: AsyncIterator[str], leave: Callable[[], None]) -> None:
        super().__init__(stream, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        self._stream, self._leave = stream, leave

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._leave()
            aclose: Callable[[], Awaitable[None]] | None = getattr(self._stream, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before it is read whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = ApiError(413, f"the request body is over {self.limit} bytes", code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            await too_big.response()(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # FastAPI passes an HTTPException from here on unchanged
                raise HTTPException(413, too_big.message)
            return message

        await self.app(scope, counted, send)
