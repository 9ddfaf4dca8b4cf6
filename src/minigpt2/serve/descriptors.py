"""File descriptors: how many connections the server may keep open, and running out of them.

Every open connection holds a descriptor, and a process may hold at most ``RLIMIT_NOFILE`` (often
1024). Past it, ``accept()`` fails with EMFILE, and so does anything else that opens a file; asyncio
then logs a traceback for each failed accept, once a second for as long as it lasts. So the server
caps its connections below the limit, and reports running out as one line now and then.

Owns ``connection_cap`` (the cap: ``max_connections`` or 1000, below the soft limit, which it first
raises toward the hard one), ``out_of_descriptors``, ``RateLimitedWarning`` and
``quiet_loop_errors`` (the event loop's exception handler: EMFILE is one rate-limited line).
Nothing here imports uvicorn.

Tests: ``pytest tests/serve/test_serve_connections.py`` (the cap, the warning with a fake clock, and a
``minigpt2 serve`` process under a low descriptor limit, flooded with idle connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import Callable
from typing import Any

from minigpt2.errors import ConfigError, UserError

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 1000
# Descriptors kept for everything but connections: stdio, the listening socket, the event loop's
# own, the page read from disk, what torch holds open. Spare ones cost nothing.
SPARE_DESCRIPTORS = 64


def raise_descriptor_limit(wanted: int) -> int | None:
    """Raises the soft ``RLIMIT_NOFILE`` toward ``wanted``, as far as the hard limit allows (only
    root may raise that). Returns the soft limit now; None where there is no limit to read."""
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        # Refused (a container's own cap, say): the current limit stays.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def connection_cap(wanted: int | None) -> int:
    """The most connections to keep open: ``wanted`` (None: ``DEFAULT_MAX_CONNECTIONS``, or fewer
    where the descriptor limit is lower), leaving ``SPARE_DESCRIPTORS`` below the limit. A
    ``wanted`` the limit cannot hold is refused, not lowered: the user asked for it."""
    cap = wanted or DEFAULT_MAX_CONNECTIONS
    soft = raise_descriptor_limit(cap + SPARE_DESCRIPTORS)
    if soft is None or cap + SPARE_DESCRIPTORS <= soft:
        return cap
    if wanted is not None:
        raise ConfigError(f"max_connections {wanted} needs {wanted + SPARE_DESCRIPTORS} file descriptors, "
                          f"but this process may open only {soft}; lower --max-connections or raise "
                          "the limit (ulimit -n)")  # fmt: skip
    if soft <= SPARE_DESCRIPTORS:
        raise UserError(f"this process may open only {soft} file descriptors, too few to serve; raise "
                        "the limit (ulimit -n)")  # fmt: skip
    return soft - SPARE_DESCRIPTORS


def out_of_descriptors(error: object) -> bool:
    """Whether ``error`` says the process (EMFILE) or the system (ENFILE) has no descriptor left."""
    return isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE)


class RateLimitedWarning:
    """Logs its message at most once every ``every`` seconds; the next line says how many were held back."""

    def __init__(self, message: str, every: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.message, self.every, self.clock = message, every, clock
        self.last: float | None = None
        self.held_back = 0

    def __call__(self) -> None:
        now = self.clock()
        if self.last is not None and now - self.last < self.every:
            self.held_back += 1
            return
        more = f" ({self.held_back} more times since the last report)" if self.held_back else ""
        log.warning("%s%s", self.message, more)
        self.last, self.held_back = now, 0


OUT_OF_DESCRIPTORS = RateLimitedWarning(
    "out of file descriptors (too many open files): new connections wait until some close; "
    "lower --max-connections or raise the limit (ulimit -n)"
)


def quiet_loop_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's exception handler: running out of descriptors is one rate-limited line;
    anything else is asyncio's default. (On EMFILE, asyncio's accept loop reports the error and
    schedules a retry a second later for each of its ``backlog`` attempts, 2048 with uvicorn: the
    flood of tracebacks. A retry that fires after the server has closed its socket fails too.)"""
    if out_of_descriptors(context.get("exception")):
        OUT_OF_DESCRIPTORS()
    elif accept_retry_after_close(context):
        log.debug("an accept retried after the server closed its socket: nothing to do")
    else:
        loop.default_exception_handler(context)


def accept_retry_after_close(context: dict[str, Any]) -> bool:
    """Whether ``context`` is asyncio's accept retry on a listening socket closed since (its file
    descriptor is -1 by then). The retry is a timer calling ``BaseSelectorEventLoop._start_serving``."""
    callback = getattr(context.get("handle"), "_callback", None)
    retry = getattr(callback, "__name__", "") == "_start_serving"
    return retry and isinstance(context.get("exception"), ValueError)
