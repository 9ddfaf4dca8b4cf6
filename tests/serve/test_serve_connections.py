"""``minigpt2 serve``'s connections: clients that never finish speaking, and more than it keeps open.

Raw sockets talk HTTP by hand to a real uvicorn server (``helpers_serve.running``) configured with
short timeouts or a small cap; every test waits for what it expects (the server closing a socket,
an answer) under a generous deadline, never for a sleep to be long enough. The cap is tested with a
few dozen sockets against a cap of 8, so the test process keeps its own descriptors; a
``minigpt2 serve`` process under a descriptor limit of 128 shows that the cap follows the limit and
that running out of descriptors is not a flood of tracebacks.
"""

from __future__ import annotations

import asyncio
import errno
import http.client
import logging
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from helpers_serve import Scripted, connect, health, running, tiny_chatbot, wait_for
from minigpt2 import serve
from minigpt2.serve import descriptors
from minigpt2.storage import checkpoint

SRC = Path(__file__).resolve().parents[2] / "src"
SHORT = serve.ServeConfig(header_timeout=0.3, body_timeout=0.3)  # seconds: the tests wait for far longer


def closed_by_server(sock: socket.socket, seconds: float = 30) -> bool:
    """Reads until the server closes ``sock``: True then, False if it is still open after ``seconds``."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_a_client_that_sends_nothing_or_half_its_headers_is_closed() -> None:
    with running(tiny_chatbot(), SHORT) as base:
        silent, half = connect(base), connect(base)
        half.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        # After a whole answer the connection waits for the next request's headers, under the same rule.
        port = int(base.rsplit(":", 1)[1].rstrip("/"))
        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        kept.request("GET", "/health")
        assert kept.getresponse().read()
        assert kept.sock is not None
        kept.sock.sendall(b"GET /health HTTP/1.1\r\nHo")
        for sock in (silent, half, kept.sock):
            assert closed_by_server(sock)
        assert health(base)["status"] == "ok"  # a client that speaks promptly is answered as ever


def test_a_trickle_of_header_bytes_does_not_keep_a_connection_open() -> None:
    """The header deadline is fixed when the wait starts: each byte that arrives does not move it."""
    with running(tiny_chatbot(), SHORT) as base, connect(base) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")
        closed = False
        for _ in range(600):  # a byte every 0.05 s, for up to 30 s
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable and closed_by_server(sock, 1):
                closed = True
                break
            try:
                sock.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        assert closed, "a client dribbling its headers kept its connection"


def test_a_body_that_stalls_is_closed() -> None:
    with running(tiny_chatbot(), SHORT) as base, connect(base) as sock:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n"
        sock.sendall(head + b"Content-Type: application/json\r\n\r\n" + b'{"messages": ')  # 13 of 100 bytes
        assert closed_by_server(sock)
        wait_for(lambda: health(base)["active"] == 0, "nothing to be running")


def test_more_idle_connections_than_the_cap_cannot_lock_out_a_client() -> None:
    """Past the cap, the connection that has waited longest for its headers makes room. The header
    timeout is long here: only the cap can free anything."""
    limits = serve.ServeConfig(max_connections=8, header_timeout=600)
    with running(tiny_chatbot(), limits) as base:
        idle = [connect(base) for _ in range(20)]
        for sock in idle[::2]:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # half the headers
        try:
            assert httpx.get(base + "health", timeout=30).json()["status"] == "ok"
            # 21 connections against a cap of 8: at least 13 were closed, the oldest first.
            assert closed_by_server(idle[0])
            wait_for(lambda: sum(closed_by_server(s, 0.01) for s in idle) >= 13, "13 idle connections closed")
        finally:
            for sock in idle:
                sock.close()


def test_when_every_connection_is_busy_a_new_one_gets_503() -> None:
    bot = tiny_chatbot()
    held = Scripted(bot.tokenizer, held=True)
    limits = serve.ServeConfig(max_connections=2, max_concurrent=2)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with (
        running(bot, limits, decoder=lambda: held) as base,
        httpx.Client(timeout=30) as one,
        httpx.Client(timeout=30) as two,
    ):
        with (
            one.stream("POST", base + "v1/chat/completions", json=body) as first,
            two.stream("POST", base + "v1/chat/completions", json=body) as second,
        ):
            first_lines, second_lines = first.iter_lines(), second.iter_lines()
            next(first_lines), next(second_lines)  # both connections are busy with an answer
            with connect(base) as third:
                reply = b""
                while chunk := third.recv(65536):
                    reply += chunk
            held.release()
        head, _, payload = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower()
        assert b'"too_many_connections"' in payload


def test_running_out_of_descriptors_is_one_line_now_and_then(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    warning = descriptors.RateLimitedWarning("out of descriptors", every=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger=descriptors.__name__):
        for second in range(12):
            now[0] = float(second)
            warning()
    assert [r.getMessage() for r in caplog.records] == [
        "out of descriptors", "out of descriptors (9 more times since the last report)"
    ]  # fmt: skip
    caplog.clear()
    loop = asyncio.new_event_loop()  # asyncio reports each failed accept through this handler
    try:
        loop.set_exception_handler(descriptors.quiet_loop_errors)
        failed_accept = {"message": "socket.accept() out of system resource",
                         "exception": OSError(errno.EMFILE, "Too many open files")}  # fmt: skip
        with caplog.at_level(logging.WARNING):
            for _ in range(100):
                loop.call_exception_handler(failed_accept)

            def _start_serving() -> None:  # as asyncio's accept retry fails once the socket is closed
                raise ValueError("Invalid file descriptor: -1")

            for _ in range(100):
                loop.call_soon(_start_serving)
            loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()
    assert len(caplog.records) <= 1 and all(r.exc_info is None for r in caplog.records)


def test_out_of_descriptors_inside_a_request_is_a_503() -> None:
    bot = tiny_chatbot()
    no_descriptors = Scripted(bot.tokenizer, fail=OSError(errno.EMFILE, "Too many open files"))
    with running(bot, decoder=lambda: no_descriptors) as base:
        body = {"messages": [{"role": "user", "content": "x"}]}
        reply = httpx.post(base + "v1/chat/completions", json=body)
        assert reply.status_code == 503 and "file descriptors" in reply.json()["error"]["message"]


def test_the_cap_follows_the_descriptor_limit_of_a_real_server(tmp_path: Path) -> None:
    """`minigpt2 serve` under a limit of 128 descriptors (so a cap of 64), flooded with 150 idle
    connections: it still answers, and says so on stderr in a few lines, with no traceback."""
    bot = tiny_chatbot()
    checkpoint.save(tmp_path / "mybot" / "best", bot.model, bot.tokenizer, {"chat_template": "dialogue"})
    env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    # The limit is set in the child itself (not with preexec_fn, unsafe in a process with threads).
    low_limit = ("import resource, runpy; resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128)); "
                 "runpy.run_module('minigpt2', run_name='__main__')")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", low_limit, "serve", "mybot", "--port", "0"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    flood: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "web chat at " in line, line
        base = line.split("web chat at ")[1].split(",")[0]
        flood = [connect(base) for _ in range(150)]
        assert httpx.get(base + "health", timeout=60).json()["status"] == "ok"
    finally:
        for sock in flood:
            sock.close()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and len(stderr.splitlines()) <= 5, stderr
