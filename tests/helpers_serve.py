"""Helpers shared by ``test_serve.py`` and ``test_serve_browser.py`` (not a test module).

``tiny_chatbot`` builds an untrained one-layer model with the dialogue template (its answers are
random characters, which is all transport tests need); ``running`` serves an app with real uvicorn
on a free loopback port in a background thread and yields its address; ``Held`` stands in for an
answer that holds its slot until the test releases it. Nothing here waits for time to pass:
``wait_for`` polls a condition (``idle``: no answer running or waiting) under a generous deadline.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import torch

from minigpt2 import serve
from minigpt2.core.chat import Chatbot, ReplyInfo
from minigpt2.core.config import ModelConfig, SampleConfig
from minigpt2.core.model import GPT
from minigpt2.core.tokenizer import CharTokenizer

# Italian letters too, so UTF-8 multi-byte characters cross the wire in every test.
CHARS = sorted(set(" \n!',-.:;?abcdefghijklmnopqrstuvwxyzàèéìòù"))


def tiny_chatbot(seed: int = 0, block_size: int = 32) -> Chatbot:
    torch.manual_seed(seed)
    tok = CharTokenizer(CHARS)
    config = ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16)
    return Chatbot(GPT(config).eval(), tok, sample=SampleConfig(max_new_tokens=40, temperature=1.0))


@contextlib.contextmanager
def running(bot: Chatbot, limits: serve.ServeConfig | None = None, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``bot`` on ``host`` (a free port) while the block runs; yields its address (``http://127.0.0.1:PORT/``)."""
    sock = serve.bind(host, 0)
    server = serve.make_server(serve.create_app(bot, limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield serve.address(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 30) -> None:
    """Polls ``condition`` until it holds; fails naming ``what`` after ``seconds`` (a deadline for
    a broken server, not a guess at how long a working one takes)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {seconds} s")
        time.sleep(0.02)


def health(base: str) -> dict[str, Any]:
    result: dict[str, Any] = httpx.get(base + "health", timeout=30).json()
    return result


def idle(base: str) -> bool:
    """No answer running and none waiting: every slot is free."""
    now = health(base)
    return now["active"] == 0 and now["waiting"] == 0


def connect(base: str) -> socket.socket:
    """A raw TCP connection to the server at ``base``, which the test speaks HTTP on by hand."""
    parts = urlsplit(base)
    return socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=30)


class Held:
    """Replaces ``bot.answer``: yields "a" at once, then each further "a" only after ``release()``,
    so an answer holds its slot for exactly as long as a test wants. Counts what it produced."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.produced = self.closed = 0
        self.lock = threading.Lock()

    def release(self) -> None:
        self.go.set()

    def __call__(self, history: Any, sample: Any, **kw: Any) -> Generator[str, None, None]:
        info: ReplyInfo = kw["info"]
        try:
            for i in range(sample.max_new_tokens):
                if i and not self.go.wait(60):  # a test that failed before releasing: end, do not hang
                    return
                with self.lock:
                    self.produced += 1
                info.completion_tokens += 1
                yield "a"
        finally:
            with self.lock:
                self.closed += 1
