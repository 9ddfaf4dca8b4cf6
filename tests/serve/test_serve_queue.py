"""``minigpt2 serve`` under load: the queue and its 429s, clients that leave, errors and many streams.

The tests that hold answers put ``helpers_serve.Scripted`` in place of the batched decoder and wait
for the server to report a state (``health``, ``idle``), so that no outcome depends on how fast the
machine is. Run with ``pytest tests/serve/test_serve_queue.py``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from helpers_serve import (
    Scripted,
    ask,
    client,
    connect,
    health,
    idle,
    running,
    stream_text,
    tiny_chatbot,
    wait_for,
)
from minigpt2 import serve


def test_busy_server_answers_429_when_the_queue_is_full() -> None:
    bot = tiny_chatbot()
    held = Scripted(bot.tokenizer, held=True)
    with running(bot, serve.ServeConfig(max_concurrent=1, max_queue=0), decoder=lambda: held) as base:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "stream": True}
        with httpx.stream("POST", base + "v1/chat/completions", json=body, timeout=30) as first:
            lines = first.iter_lines()  # kept: dropping the iterator would close the connection
            next(lines)  # the first answer is running, and holds the only slot until released
            busy = ask(base)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                client(base).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
            held.release()
        wait_for(lambda: idle(base), "the first answer to free its slot")
        assert ask(base, max_tokens=2).status_code == 200  # free again once the first has gone


def test_waiting_requests_queue_and_all_get_answers() -> None:
    bot = tiny_chatbot()
    slow = Scripted(bot.tokenizer, delay=0.005)
    limits = serve.ServeConfig(max_concurrent=1, max_queue=10)
    with running(bot, limits, decoder=lambda: slow) as base, concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda _: ask(base, max_tokens=20), range(6)))
    assert [r.status_code for r in replies] == [200] * 6
    assert all(r.json()["choices"][0]["message"]["content"] == "a" * 20 for r in replies)


def test_a_burst_cannot_slip_past_the_queue_limit() -> None:
    """12 requests released at once against 1 slot + 2 queue places: 3 answered, 9 refused."""
    bot = tiny_chatbot()
    held = Scripted(bot.tokenizer, held=True)
    with running(bot, serve.ServeConfig(max_concurrent=1, max_queue=2), decoder=lambda: held) as base:
        barrier = threading.Barrier(12)

        def burst(_: int) -> int:
            barrier.wait()
            return ask(base, max_tokens=30).status_code

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(burst, i) for i in range(12)]
            # The answers admitted cannot end while they are held: what ends first was refused.
            wait_for(lambda: sum(f.done() for f in futures) >= 9, "nine requests to be answered")
            refused = [f.result() for f in futures if f.done()]
            assert health(base)["active"] == 1 and health(base)["waiting"] == 2
            held.release()
            codes = sorted(f.result() for f in futures)
    assert refused == [429] * 9
    assert codes == [200] * 3 + [429] * 9


def post_and_wait(base: str, body: dict[str, Any]) -> Any:
    """Sends a whole request over a raw socket and returns the socket (closing it leaves)."""
    data = json.dumps(body).encode()
    sock = connect(base)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))  # fmt: skip
    return sock


def test_a_client_that_leaves_the_queue_frees_its_place() -> None:
    bot = tiny_chatbot()
    held = Scripted(bot.tokenizer, held=True)
    with running(bot, serve.ServeConfig(max_concurrent=1, max_queue=1), decoder=lambda: held) as base:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
        with httpx.stream("POST", base + "v1/chat/completions", json=body, timeout=30) as first:
            lines = first.iter_lines()
            next(lines)  # the only slot is busy until the answer is released
            second = post_and_wait(base, body)
            wait_for(lambda: health(base)["waiting"] == 1, "the second request to queue")
            second.close()  # its client leaves...
            wait_for(lambda: health(base)["waiting"] == 0, "its place in the queue to be freed")
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                third = pool.submit(ask, base, max_tokens=3)
                wait_for(lambda: health(base)["waiting"] == 1 or third.done(), "the third request")
                assert not third.done(), third.result().text  # ...so a new one queues: no 429
                held.release()
                assert third.result().status_code == 200


def test_an_internal_error_is_a_json_error_not_a_crash() -> None:
    bot = tiny_chatbot()
    broken = Scripted(bot.tokenizer, fail=RuntimeError("the model fell over"), fail_after=1)
    with running(bot, decoder=lambda: broken) as base:
        plain = ask(base)
        assert plain.status_code == 500 and "fell over" in plain.json()["error"]["message"]
        with httpx.stream("POST", base + "v1/chat/completions", json={"messages": [
                {"role": "user", "content": "x"}], "stream": True}, timeout=30) as response:  # fmt: skip
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert "fell over" in json.loads(events[-1].removeprefix("data: "))["error"]["message"]
        wait_for(lambda: idle(base), "the failed answer to free its slot")


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_stops_its_generation(stream: bool) -> None:
    bot = tiny_chatbot()
    slow = Scripted(bot.tokenizer, delay=0.02)
    with running(bot, serve.ServeConfig(max_tokens=1000), decoder=lambda: slow) as base:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000, "stream": stream}
        endpoint = base + "v1/chat/completions"
        # Streaming: leave after a few events. Not streaming: give up waiting after half a second.
        with (
            pytest.raises(httpx.ReadTimeout),
            httpx.stream("POST", endpoint, json=body, timeout=0.5) as response,
        ):
            for i, _ in enumerate(response.iter_lines()):
                if i == 5:
                    raise httpx.ReadTimeout("the client leaves")
        wait_for(
            lambda: idle(base) and slow.cancelled == 1 and health(base)["rows"] == 0,
            "the generation to stop and free its slot and row",
        )
        assert slow.produced < 1000  # stopped before the end: at least 20 s away, at 0.02 s a character


def test_answers_running_together_take_no_thread_each() -> None:
    """Every answer's text is made on the event loop, fed by the one decoding thread: five answers
    streaming at once (each held after its first character) run on as many threads as one does."""
    bot = tiny_chatbot()
    held = Scripted(bot.tokenizer, "ab", held=True)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "stream": True}
    threads: list[int] = []
    with running(bot, serve.ServeConfig(max_concurrent=8), decoder=lambda: held) as base:
        with contextlib.ExitStack() as streams:
            kept: list[Iterator[str]] = []  # kept: dropping an iterator would close its connection
            for _ in range(5):
                response = streams.enter_context(
                    httpx.stream("POST", base + "v1/chat/completions", json=body, timeout=30)
                )
                kept.append(response.iter_lines())
                while '"content":"a"' not in next(kept[-1]).replace(" ", ""):
                    pass  # the role chunk, then the first character: the answer is running
                threads.append(threading.active_count())
            held.release()
        wait_for(lambda: idle(base), "the answers to end")
    assert threads == threads[:1] * 5


def test_load_twenty_concurrent_streams_lose_and_mix_nothing() -> None:
    bot = tiny_chatbot(seed=1)
    with running(bot, serve.ServeConfig(max_concurrent=2, max_queue=32)) as base:
        requests = [
            {"messages": [{"role": "user", "content": f"messaggio {i}"}], "seed": i, "max_tokens": 60}
            for i in range(20)
        ]
        expected = [ask(base, **r).json()["choices"][0]["message"]["content"] for r in requests]
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            streamed = list(pool.map(lambda r: stream_text(base, **r), requests))
        assert [s.strip() for s in streamed] == expected
        wait_for(lambda: idle(base), "every slot to be free")  # a stream's slot is freed after its last byte
        assert health(base) == {"status": "ok", "model": "minigpt2", "active": 0, "waiting": 0, "rows": 0}
