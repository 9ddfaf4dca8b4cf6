"""Putting an app on the network: a listening socket, its address, and a uvicorn server.

Owns ``bind`` (a TCP socket that already listens, with friendly errors for a busy port or a bad
host), ``address`` (its URL), ``make_server`` (uvicorn, quiet, for any ASGI app) and ``run_server``
(all three, until Ctrl-C; what ``minigpt2 serve`` calls). uvicorn is imported only when a server is
made, so the app can be built and tested without it.

Tests: ``pytest tests/test_serve.py`` (every test runs a real server on a free loopback port).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from minigpt2.errors import UserError

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening TCP socket; ``port=0`` picks a free port (read it from ``getsockname()``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if not 0 <= port <= 65535:
        sock.close()
        raise UserError(f"port must be in [0, 65535] (0 picks a free one), got {port}")
    try:
        sock.bind((host, port))
        sock.listen(2048)  # now, so the address given to on_ready already accepts connections
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use; pick another with --port") from None
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror}; check --host") from None
    return sock


def address(sock: socket.socket) -> str:
    """The URL of a bound socket, e.g. ``http://127.0.0.1:8000/``."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if sock.family == socket.AF_INET6 else f"http://{host}:{port}/"


def make_server(app: FastAPI) -> uvicorn.Server:
    """A uvicorn server for ``app``; call ``.run(sockets=[bind(...)])``, set ``.should_exit`` to stop."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))


def run_server(
    app: FastAPI, host: str = "127.0.0.1", port: int = 8000, on_ready: Callable[[str], None] | None = None
) -> None:
    """Serve ``app`` until Ctrl-C; ``on_ready`` receives the address once the socket listens."""
    sock = bind(host, port)
    server = make_server(app)
    if on_ready is not None:
        on_ready(address(sock))
    server.run(sockets=[sock])
