"""Putting an app on the network: a listening socket, its addresses, and a uvicorn server.

Owns ``bind`` (a TCP socket that already listens, with friendly errors for a busy port or a bad
host), ``address`` and ``addresses`` (URLs a browser can open: for a server on every interface,
0.0.0.0 or ::, the loopback one and this machine's other addresses, never ``http://0.0.0.0/``),
``make_server`` (uvicorn, quiet, with the connection limits of ``connections``) and ``run_server``
(all of it, until Ctrl-C; what ``minigpt2 serve`` calls). uvicorn is imported only when a server is
made, so the app can be built and tested without it.

Tests: ``pytest tests/serve/test_serve.py`` (every test runs a real server on a free loopback port) and
``tests/serve/test_serve_http.py`` (the addresses of a server on every interface).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from minigpt2.errors import UserError
from minigpt2.serve.config import ServeConfig
from minigpt2.serve.descriptors import connection_cap

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

# The addresses that mean "every interface", and the loopback address a browser can open instead.
EVERY_INTERFACE = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening TCP socket; ``port=0`` picks a free port (read it from ``getsockname()``)."""
    host = host.removeprefix("[").removesuffix("]")  # "[::1]", as written in URLs
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


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def address(sock: socket.socket) -> str:
    """The URL of a bound socket that a browser can open, e.g. ``http://127.0.0.1:8000/``."""
    host, port = sock.getsockname()[:2]
    return addresses(host, port)[0]


def addresses(host: str, port: int) -> list[str]:
    """The URLs a browser can open for a server listening on ``host:port``. For every interface
    (0.0.0.0 or ::): the loopback one first, then this machine's other addresses of that family."""
    host = host.removeprefix("[").removesuffix("]")
    if host not in EVERY_INTERFACE:
        return [url(host, port)]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    found = [EVERY_INTERFACE[host], *machine_addresses(family)]
    return [url(a, port) for a in dict.fromkeys(found)]


def machine_addresses(family: socket.AddressFamily) -> list[str]:
    """This machine's addresses other than loopback and link-local, found without sending a packet:
    those of its host name (from /etc/hosts, or the resolver), and the one its default route leaves
    from (connecting a UDP socket sends nothing; the address is a documentation one)."""
    found: list[str] = []
    with contextlib.suppress(OSError):
        for *_, sockaddr in socket.getaddrinfo(socket.gethostname(), None, family, socket.SOCK_STREAM):
            found.append(str(sockaddr[0]))
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(("2001:db8::1" if family == socket.AF_INET6 else "192.0.2.1", 9))
        found.append(probe.getsockname()[0])
    usable = []
    for name in found:
        ip = ipaddress.ip_address(name.partition("%")[0])
        if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified):
            usable.append(str(ip))
    return list(dict.fromkeys(usable))


def make_server(app: FastAPI, limits: ServeConfig | None = None) -> uvicorn.Server:
    """A uvicorn server for ``app`` with the connection limits of ``limits`` (default: those
    ``create_app`` was given); call ``.run(sockets=[bind(...)])``, set ``.should_exit`` to stop."""
    import uvicorn

    from minigpt2.serve.connections import Server, guarded_protocol

    limits = limits or getattr(app.state, "limits", None) or ServeConfig()
    protocol = guarded_protocol(connection_cap(limits.max_connections), limits.header_timeout,
                                limits.body_timeout)  # fmt: skip
    # The lifespan starts the app's decoding thread and stops it when the server stops.
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", http=protocol,
                            ws="none")  # fmt: skip
    return Server(config)


def run_server(
    app: FastAPI, host: str = "127.0.0.1", port: int = 8000, on_ready: Callable[[str], None] | None = None
) -> None:
    """Serve ``app`` until Ctrl-C; ``on_ready`` receives the address once the socket listens."""
    server = make_server(app)
    sock = bind(host, port)
    if on_ready is not None:
        on_ready(address(sock))
    server.run(sockets=[sock])
