"""Connections: how long a client may take to speak, and how many may be open at once.

uvicorn closes a keep-alive connection that stays silent, but not one that never sends a request,
sends half its headers or stops in the middle of its body: each of those would hold a socket (and
a file descriptor) forever. ``GuardedH11Protocol`` is uvicorn's h11 protocol with what is missing:

- a deadline for each request's headers (``header_timeout``), counted from the connection's
  opening or the end of the previous answer; bytes that trickle in do not move it;
- a stall timeout for each request's body (``body_timeout``), restarted by every byte that arrives
  (and not counted while the server itself has stopped reading);
- a cap on open connections (``max_connections``): a new connection past it closes the one that has
  waited longest for its headers, so idle clients cannot lock out one that is about to speak; if
  every connection is busy with a request, the new one gets a 503 instead.

Owns ``GuardedH11Protocol``, ``guarded_protocol`` (its class for one server, for
``uvicorn.Config(http=...)``) and ``Server`` (uvicorn's server, with ``quiet_loop_errors`` as the
event loop's exception handler). Only ``server.make_server`` imports this module.

Tests: ``pytest tests/serve/test_serve_connections.py`` (raw sockets that send nothing, half the headers,
a trickle or half a body; more idle connections than the cap).
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from minigpt2.serve.descriptors import quiet_loop_errors


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, a body stall timeout and a connection cap."""

    max_connections: ClassVar[int]
    header_timeout: ClassVar[float]
    body_timeout: ClassVar[float]
    # The server's connections waiting for a request's headers, the longest waiting first.
    waiting: ClassVar[dict[GuardedH11Protocol, None]]
    _timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self._over_cap() and not self._make_room():
            transport.write(busy_reply(self.max_connections))
            transport.close()
            return
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch(progress=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)

    def _watch(self, progress: bool = False) -> None:
        """Arms the timer the request's state calls for: the header deadline while the connection waits
        for a request, the body stall timeout while it sends one, none while its answer is made."""
        if self.transport.is_closing():
            self._forget()
        elif self.conn.their_state is h11.IDLE:
            if self not in self.waiting:  # a new wait: its deadline is fixed now
                self.waiting[self] = None
                self._arm(self.header_timeout)
        elif self.conn.their_state is h11.SEND_BODY:
            self.waiting.pop(self, None)
            if progress or self._timer is None:
                self._arm(self.body_timeout)
        else:
            self._forget()

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(seconds, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self.flow.read_paused:  # the server stopped reading (the app has not taken the body yet)
            self._arm(self.body_timeout)
            return
        self._close()

    def _forget(self) -> None:
        self.waiting.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close(self) -> None:
        self._forget()
        if not self.transport.is_closing():
            self.transport.close()

    def _over_cap(self) -> bool:
        if len(self.connections) <= self.max_connections:
            return False
        # Connections being closed still count until the loop's next turn: only the others do.
        return sum(not c.transport.is_closing() for c in self.connections) > self.max_connections

    def _make_room(self) -> bool:
        """Closes the connection that has waited longest for its headers; False if none waits."""
        oldest = next(iter(self.waiting), None)
        if oldest is None:
            return False
        oldest._close()
        return True


def guarded_protocol(max_connections: int, header_timeout: float, body_timeout: float) -> type[H11Protocol]:
    """The protocol class of one server: its limits, and its own record of waiting connections."""

    class Protocol(GuardedH11Protocol):
        pass

    Protocol.max_connections, Protocol.waiting = max_connections, {}
    Protocol.header_timeout, Protocol.body_timeout = header_timeout, body_timeout
    return Protocol


def busy_reply(limit: int) -> bytes:
    """A whole 503 response, written before the request is read (so not through h11)."""
    error = {"message": f"the server has {limit} open connections, its limit; try again shortly",
             "type": "server_error", "param": None, "code": "too_many_connections"}  # fmt: skip
    body = json.dumps({"error": error}).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n")  # fmt: skip
    return head.encode() + body


class Server(uvicorn.Server):
    """uvicorn's server; running out of file descriptors is one line now and then, not a traceback
    a second."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(quiet_loop_errors)
        await super().startup(sockets=sockets)
