"""The server's settings: ``ServeConfig``, the one home of every ``minigpt2 serve`` limit and default.

Owns ``ServeConfig`` (each field a ``minigpt2 serve`` option of the same name; the command-line
parser, ``cli/parser.py``, takes its defaults from here), ``LIMITS`` and ``CONNECTION_LIMITS`` (the
fields that are plain options), ``STREAM_INTERVAL`` and ``check_api_key`` (the rules a key must
meet, run by ``ServeConfig``). It imports neither the web framework nor torch, so that building the
parser (``minigpt2 --help``) stays fast.

Tests: ``pytest tests/serve/test_serve_replies.py`` (the stream interval, from the command line to the
server), ``tests/serve/test_serve_http.py`` (API keys) and ``tests/serve/test_serve_cli.py`` (options out
of range).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from minigpt2.errors import ConfigError

# The default of ``ServeConfig.stream_interval``; the measurements behind it are in
# docs/performance.md (serving).
STREAM_INTERVAL = 0.05


@dataclass
class ServeConfig:
    """Limits of ``minigpt2 serve``; every one is a command-line option of the same name."""

    max_message_chars: int = 4000  # one message's text
    max_history_chars: int = 32000  # all messages of one request together
    max_messages: int = 200  # messages in one request
    max_tokens: int = 1000  # the most characters one answer may ask for
    default_max_tokens: int = 300  # when the request does not say (`serve --max-new-tokens`); <= max_tokens
    # Rows of the batch: answers generated together, one character each per batched model step (a
    # request with n choices takes n). 32 from benchmarks/serve_load.py on a 2-core AMD EPYC (cpu
    # preset, random weights, int8 decoding weights, 100-character answers, 2026-12-01, two rounds):
    # 20 streaming clients were served 3.9-4.0k characters/s at 8 rows, 3.8-3.9k at 16 and 4.2-4.7k
    # at 32; from 32 rows all 20 run at once (first character within 0.12 s, p95), where 8 and 16
    # rows queue some of them (p95 0.58 and 0.54 s).
    max_concurrent: int = 32
    max_queue: int = 32  # requests waiting for a free slot before the next ones get 429
    max_body_bytes: int = 1_000_000  # request bodies larger than this get 413
    # Open connections at most (None: 1000, fewer if the file descriptor limit is lower; see
    # server.connection_cap). At the cap, the connection waiting longest for its headers is closed.
    max_connections: int | None = None
    # Seconds a connection may take to send a request's headers (from its opening, or from the end
    # of the previous answer); a client that sends nothing, or dribbles bytes, is closed after it.
    header_timeout: float = 10.0
    body_timeout: float = 30.0  # seconds a request body may go without a byte arriving
    # Seconds at least between two chunks of one streamed answer (the first goes at once): what is
    # generated meanwhile goes in the next chunk. A chunk costs the server and the client far more
    # than a character; 0 sends each piece as soon as it exists.
    stream_interval: float = STREAM_INTERVAL
    api_key: str | None = None  # when set, /v1 needs "Authorization: Bearer <api_key>"
    model_id: str = "minigpt2"  # the name /v1/models reports
    # Host headers accepted (empty or "*": any; "loopback": every name of this machine's loopback,
    # as `minigpt2 serve` on a loopback address sets it), so that a web page on another site cannot
    # reach the server by renaming itself to a loopback address (DNS rebinding).
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in (*LIMITS, "default_max_tokens"):
            if name != "max_queue" and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ConfigError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ConfigError(f"max_connections must be >= 1, got {self.max_connections}")
        for name in ("header_timeout", "body_timeout"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"{name} must be a number of seconds > 0, got {getattr(self, name)}")
        if not (math.isfinite(self.stream_interval) and 0 <= self.stream_interval <= 1):
            raise ConfigError(
                f"stream_interval must be a number of seconds in [0, 1], got {self.stream_interval}"
            )
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens)
        if self.api_key is not None:
            check_api_key(self.api_key)


# The ServeConfig fields that are plain integer limits (command-line options of the same name).
LIMITS = ("max_message_chars", "max_history_chars", "max_messages", "max_tokens", "max_concurrent",
          "max_queue", "max_body_bytes")  # fmt: skip
# The ServeConfig fields that bound connections (command-line options of the same name too).
CONNECTION_LIMITS = ("max_connections", "header_timeout", "body_timeout")


def check_api_key(key: str, name: str = "api_key") -> None:
    """Refuses a key that some HTTP client could not send as typed (``name`` says where it came from).
    Header values are bytes: httpx (and so the ``openai`` client) encodes them as ASCII, browsers as
    Latin-1, curl as the terminal's UTF-8, and all drop the spaces around a value; only printable
    ASCII reaches the server the same from every one."""
    if not key.strip():
        raise ConfigError(f"{name} is empty; give a key or leave it out")
    if key != key.strip():
        raise ConfigError(f"{name} starts or ends with whitespace, which HTTP drops; remove it")
    bad = next((c for c in key if not " " <= c <= "~"), None)
    if bad is not None:
        where = f"{bad!r} (character {key.index(bad) + 1})"
        raise ConfigError(f"{name} holds {where}, but HTTP clients can send only printable ASCII in a "
                          "header: use letters, digits and punctuation")  # fmt: skip
