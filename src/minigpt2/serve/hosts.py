"""Which ``Host`` headers the server answers: the defence against DNS rebinding.

A web page on another site can make a browser send requests to a server on this machine's
loopback by pointing its own name at 127.0.0.1; the browser then sends that site's name as
``Host``. A server on loopback therefore answers only requests whose ``Host`` names the loopback.

Owns ``host_name`` (the host of a ``Host`` header: ``name``, ``name:port``, ``[v6]``,
``[v6]:port``), ``is_loopback`` (``localhost``, 127.0.0.0/8, ``::1``, and 127.x written as an
IPv4-mapped IPv6 address), ``LOOPBACK`` (the ``allowed_hosts`` entry that stands for all of them) and
``HostCheck`` (ASGI middleware: any other ``Host`` gets a 400 with OpenAI's JSON error body).
Starlette's ``TrustedHostMiddleware`` is not used: it cuts the header at its first colon, so it
cannot read ``[::1]:8000``.

Tests: ``pytest tests/serve/test_serve_http.py`` (every loopback spelling, with and without a port, on
an IPv4 and an IPv6 server, and the names refused).
"""

from __future__ import annotations

import ipaddress

from starlette.types import ASGIApp, Receive, Scope, Send

from minigpt2.serve.schema import ApiError

LOOPBACK = "loopback"  # in ServeConfig.allowed_hosts: every name of this machine's loopback


def host_name(header: str) -> str | None:
    """The host a ``Host`` header names, lowercased, without its port, brackets or final dot;
    None when the header is malformed (a port that is not a number, an unclosed bracket)."""
    header = header.strip().lower()
    if header.startswith("["):  # an IPv6 address: "[::1]" or "[::1]:8000"
        name, closed, rest = header[1:].partition("]")
        port = rest.removeprefix(":")
        if not closed or (rest and (not rest.startswith(":") or not port.isdigit())):
            return None
    elif header.count(":") > 1:  # a bare IPv6 address, which cannot carry a port
        name = header
    else:
        name, colon, port = header.partition(":")
        if colon and not port.isdigit():
            return None
    name = name.removesuffix(".")
    return name or None


def is_loopback(name: str) -> bool:
    """True for a name that can only mean this machine: localhost, 127.0.0.0/8, ::1, ::ffff:127.x."""
    name = name.strip().lower().removeprefix("[").removesuffix("]").removesuffix(".")
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def host_allowed(header: str, allowed: tuple[str, ...]) -> bool:
    """Whether a request with this ``Host`` header may be answered (empty ``allowed``: any)."""
    if not allowed or "*" in allowed:
        return True
    name = host_name(header)
    if name is None:
        return False
    return name in allowed or (LOOPBACK in allowed and is_loopback(name))


class HostCheck:
    """ASGI middleware: a request whose ``Host`` is not allowed gets 400 before anything else runs."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app, self.allowed = app, allowed
        loopback = "loopback names (localhost, 127.0.0.1, [::1])"
        self.names = ", ".join(loopback if name == LOOPBACK else name for name in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not host_allowed(header, self.allowed):
                error = ApiError(400, f"the Host header {header!r} is not allowed; this server answers only "
                                 f"to {self.names}", "Host", "invalid_host")  # fmt: skip
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
