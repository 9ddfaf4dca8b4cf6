"""Helpers shared by the ``test_serve*.py`` modules (not a test module).

``tiny_chatbot`` builds an untrained one-layer model with the dialogue template (its answers are
random characters, which is all transport tests need); ``running`` serves an app with real uvicorn
on a free loopback port in a background thread and yields its address; ``client`` (the official
``openai`` client), ``ask`` (a raw POST) and ``stream_text`` talk to it. Two stand-ins for the
server's batched decoder (``serve.create_app(decoder=...)``): ``Scripted`` answers known text, one
character a step, and can hold its answers until the test releases them, pace them or fail;
``Paced`` wraps the real decoder and steps only when the test allows it. Nothing here waits for
time to pass: ``wait_for`` polls a condition (``idle``: no answer running or waiting) under a
generous deadline.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import torch

from minigpt2 import serve
from minigpt2.core.chat import Chatbot
from minigpt2.core.config import ModelConfig, SampleConfig
from minigpt2.core.model import GPT
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.fast.batch_decoder import BatchDecoder, Row

# Italian letters too, so UTF-8 multi-byte characters cross the wire in every test.
CHARS = sorted(set(" \n!',-.:;?abcdefghijklmnopqrstuvwxyzàèéìòù"))


def tiny_chatbot(seed: int = 0, block_size: int = 32) -> Chatbot:
    torch.manual_seed(seed)
    tok = CharTokenizer(CHARS)
    config = ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16)
    return Chatbot(GPT(config).eval(), tok, sample=SampleConfig(max_new_tokens=40, temperature=1.0))


@contextlib.contextmanager
def running(
    bot: Chatbot,
    limits: serve.ServeConfig | None = None,
    host: str = "127.0.0.1",
    decoder: Callable[[], Any] | None = None,
) -> Iterator[str]:
    """Serve ``bot`` on ``host`` (a free port) while the block runs; yields its address
    (``http://127.0.0.1:PORT/``). ``decoder``: the app's batched decoder (default: the real one)."""
    sock = serve.bind(host, 0)
    server = serve.make_server(serve.create_app(bot, limits, decoder))
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


def client(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "v1", api_key=key, max_retries=0, timeout=30)


def ask(base: str, **body: Any) -> httpx.Response:
    body.setdefault("messages", [{"role": "user", "content": "hello"}])
    return httpx.post(base + "v1/chat/completions", json=body, timeout=30)


def stream_text(base: str, **body: Any) -> str:
    return "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client(base).chat.completions.create(model="minigpt2", stream=True, **body)
        if chunk.choices
    )


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


class Scripted:
    """Stands in for the server's ``BatchDecoder``: every row answers ``text`` (repeated up to its
    max_tokens; "" is an empty answer), one character a step. ``held``: after a row's first
    character the next ones wait for ``release()``, so an answer holds its slot for exactly as long
    as a test wants. ``delay``: seconds a step takes. ``fail``: raised by the step that would draw a
    row's character number ``fail_after`` (by ``add`` if that is 0). Counts the characters it
    produced and the rows cancelled."""

    def __init__(self, tok: CharTokenizer, text: str = "a", *, held: bool = False, delay: float = 0.0,
                 fail: Exception | None = None, fail_after: int = 0, max_rows: int = 64) -> None:  # fmt: skip
        self.ids, self.held, self.delay = tok.encode(text), held, delay
        self.fail, self.fail_after, self.max_rows = fail, fail_after, max_rows
        self.go = threading.Event()
        self.rows: list[Row] = []
        self.produced = self.cancelled = 0

    def release(self) -> None:
        self.go.set()

    @property
    def free(self) -> int:
        return self.max_rows - len(self.rows)

    def add(self, prompt: Sequence[int], cfg: SampleConfig, *, stop_ids: Sequence[int] = (),
            min_new_tokens: int = 0, generator: Any = None) -> Row:  # fmt: skip
        if self.fail is not None and self.fail_after == 0:
            raise self.fail
        row = Row(0, cfg, frozenset(stop_ids), min_new_tokens, generator, list(prompt), len(prompt), 0)
        self.rows.append(row)
        return row

    def step(self) -> list[tuple[Row, int | None]]:
        time.sleep(self.delay)
        ready = [r for r in self.rows if not (self.held and r.new_ids and not self.go.is_set())]
        if not ready:  # every answer is held: wait a moment, so the loop can take commands
            self.go.wait(0.01)
            return []
        events: list[tuple[Row, int | None]] = []
        for row in ready:
            drawn = len(row.new_ids)
            if self.fail is not None and drawn >= self.fail_after > 0:
                raise self.fail
            if not self.ids:  # an empty answer: the row draws a stop id at once
                self._leave(row, "stop")
                events.append((row, None))
                continue
            row.tokens.append(self.ids[drawn % len(self.ids)])
            self.produced += 1
            if drawn + 1 >= row.cfg.max_new_tokens:
                self._leave(row, "length")
            events.append((row, row.tokens[-1]))
        return events

    def cancel(self, row: Row) -> None:
        if not row.finished:
            self.cancelled += 1
            self._leave(row, "cancelled")

    def _leave(self, row: Row, reason: str) -> None:
        row.finish_reason = reason
        self.rows.remove(row)


class Paced:
    """The server's real ``BatchDecoder`` over ``bot``, stepping only as far as ``allow(n)`` lets it
    (``unlimited``: every step, once ``gather`` rows have joined); between steps it waits a moment,
    so the loop still takes commands. ``steps`` counts the steps taken, ``most`` the most rows one
    step advanced."""

    def __init__(self, bot: Chatbot, rows: int, unlimited: bool = False, gather: int = 0) -> None:
        self.inner = BatchDecoder(bot.model, max_rows=rows, precision=bot.precision)
        self.unlimited, self.gather = unlimited, gather
        self.steps = self.most = 0
        self._permits = threading.Semaphore(0)

    def allow(self, n: int = 1) -> None:
        self._permits.release(n)

    @property
    def rows(self) -> list[Row]:
        return self.inner.rows

    @property
    def free(self) -> int:
        return self.inner.free

    def add(self, prompt: Sequence[int], cfg: SampleConfig, **kw: Any) -> Row:
        return self.inner.add(prompt, cfg, **kw)

    def cancel(self, row: Row) -> None:
        self.inner.cancel(row)

    def step(self) -> list[tuple[Row, int | None]]:
        if len(self.rows) >= self.gather:
            self.gather = 0  # gathered once: from now on rows leave and join as they do
        go = self.unlimited and not self.gather
        if not go and not self._permits.acquire(timeout=0.01):
            return []
        self.steps += 1
        self.most = max(self.most, len(self.rows))
        return self.inner.step()
