"""Admission control: how much work the server takes on, and how it lets go of it.

Owns ``Gate`` (at most ``max_concurrent`` answers generated at once, up to ``max_queue`` more
waiting, the rest refused with 429; a client that leaves the queue gives up its place),
``pieces`` (an answer computed piece by piece in worker threads, stopped when its reader goes),
``SlotResponse`` (a server-sent-event stream that frees its slot however it ends) and ``BodyLimit``
(ASGI middleware: bodies over ``max_body_bytes`` get 413 before they are read whole).

Tests: ``pytest tests/test_serve.py`` (the load, queue, 429, disconnect and body-size cases).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator

import anyio
from fastapi import HTTPException
from fastapi.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from minigpt2.serve.schema import ApiError


class ClientGoneError(Exception):
    """The client disconnected while its request waited for a slot."""


class Gate:
    """At most ``slots`` answers at once; up to ``queue`` more requests wait, later ones get 429."""

    def __init__(self, slots: int, queue: int) -> None:
        self.slots, self.queue = slots, queue
        # Requests let in (running or waiting). Counted before any await, so a burst of requests
        # arriving together cannot slip past the limit while the semaphore hands slots over.
        self.admitted = self.active = 0
        self._free = anyio.Semaphore(slots)
        self.limiter = anyio.CapacityLimiter(slots)  # worker threads for the model

    @property
    def waiting(self) -> int:
        return self.admitted - self.active

    async def enter(self, gone: Callable[[], Awaitable[bool]] | None = None) -> Callable[[], None]:
        """Wait for a slot; returns the function that frees it (safe to call more than once).
        ``gone`` is polled while waiting: a client that has left gives up its place in the queue."""
        if self.admitted >= self.slots + self.queue:
            raise ApiError(429, f"the server is busy ({self.active} answers running, {self.waiting} "
                           "waiting); try again shortly", code="server_busy")  # fmt: skip
        self.admitted += 1
        try:
            await self._acquire(gone)
        except BaseException:
            self.admitted -= 1
            raise
        self.active += 1
        freed = False

        def leave() -> None:
            nonlocal freed
            if not freed:
                freed = True
                self.active -= 1
                self.admitted -= 1
                self._free.release()

        return leave

    async def _acquire(self, gone: Callable[[], Awaitable[bool]] | None) -> None:
        if gone is None:
            await self._free.acquire()
            return
        got = False
        async with anyio.create_task_group() as group:

            async def take() -> None:
                nonlocal got
                await self._free.acquire()
                got = True
                group.cancel_scope.cancel()

            async def watch() -> None:
                while not await gone():
                    await anyio.sleep(0.2)
                group.cancel_scope.cancel()

            group.start_soon(take)
            group.start_soon(watch)
        if not got:
            raise ClientGoneError


async def pieces(
    answer: Generator[str, None, None], limiter: anyio.CapacityLimiter
) -> AsyncGenerator[str, None]:
    """The pieces of ``answer``, each computed in a worker thread. Closing this async generator
    (``contextlib.aclosing``: the client went away) closes ``answer``: no more tokens are made."""
    try:
        while True:
            piece = await anyio.to_thread.run_sync(next, answer, None, limiter=limiter)
            if piece is None:
                return
            yield piece
    finally:
        answer.close()


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
