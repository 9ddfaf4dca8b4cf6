"""``minigpt2 serve``: the OpenAI-compatible API, tested with real clients over loopback.

The official ``openai`` package talks to a real uvicorn server (plain and streaming replies), httpx
sends the bad requests and the raw event stream, 20 concurrent streaming clients check that no reply
is lost or mixed up, and the ``minigpt2 serve`` command runs as a real process. The queue tests hold
answers (``helpers_serve.Scripted``, in place of the batched decoder) and wait for the server to
report a state, so that no outcome depends on how fast the machine is. What batching itself
promises (the same answer alone or among others, rows that leave at once, ``n``) is
``test_serve_batch.py``'s. Connections are ``test_serve_connections.py``'s, Host names,
methods and key rules ``test_serve_http.py``'s, the browser ``test_serve_browser.py``'s.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from helpers_serve import Scripted, connect, health, idle, running, tiny_chatbot, wait_for
from minigpt2 import checkpoint, serve
from minigpt2.core.chat import ReplyInfo, Turn
from minigpt2.core.config import SampleConfig

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """One server for the read-only tests of this module (default limits, no API key)."""
    limits = serve.ServeConfig(max_tokens=200, max_message_chars=500, max_history_chars=2000, max_messages=20)
    with running(tiny_chatbot(), limits) as base:
        yield base


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


# --- the official client ---------------------------------------------------------------------------


def test_openai_client_plain_reply(url: str) -> None:
    reply = client(url).chat.completions.create(
        model="anything", messages=[{"role": "user", "content": "ciao, come stai?"}], seed=1, max_tokens=30
    )
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "minigpt2"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > len("ciao, come stai?")  # the message plus its turn markers
    assert 1 <= reply.usage.completion_tokens <= 30
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_openai_client_streams_the_same_reply_in_pieces(url: str) -> None:
    messages = [{"role": "user", "content": "dimmi qualcosa"}]
    whole = client(url).chat.completions.create(model="m", messages=messages, seed=5, max_tokens=40)
    chunks = list(
        client(url).chat.completions.create(
            model="m",
            messages=messages,
            seed=5,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces).strip() == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # include_usage: a last chunk
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_models_endpoints(url: str) -> None:
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["minigpt2"]
    card = httpx.get(url + "v1/models").json()["data"][0]  # what the web page starts its controls from
    assert card["limits"]["max_tokens"] == 200 and card["defaults"]["max_tokens"] == 200
    assert card["defaults"]["temperature"] == 1.0
    assert client(url).models.retrieve("minigpt2").id == "minigpt2"
    with pytest.raises(openai.NotFoundError):
        client(url).models.retrieve("gpt-4")
    assert httpx.get(url + "health").json()["status"] == "ok"
    page = httpx.get(url)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "<script>" in page.text and "<style>" in page.text  # inline: no build step
    assert not re.search(
        r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(""", page.text
    )  # nothing external


def test_max_tokens_ends_with_length_and_seed_repeats(url: str) -> None:
    first = ask(url, max_tokens=3, temperature=1.5, seed=2).json()
    again = ask(url, max_tokens=3, temperature=1.5, seed=2).json()
    assert first["choices"][0]["message"] == again["choices"][0]["message"]
    if first["usage"]["completion_tokens"] == 3:
        assert first["choices"][0]["finish_reason"] == "length"
    # max_completion_tokens (the newer name) wins over max_tokens
    short = ask(url, max_completion_tokens=2, max_tokens=100, seed=2, temperature=2).json()
    assert short["usage"]["completion_tokens"] <= 2 and len(short["choices"][0]["message"]["content"]) <= 2


def test_top_p_zero_is_greedy_and_a_negative_seed_is_random(url: str) -> None:
    greedy = ask(url, top_p=0, temperature=1.5, seed=1, max_tokens=20).json()["choices"][0]["message"]
    assert greedy == ask(url, temperature=0, seed=99, max_tokens=20).json()["choices"][0]["message"]
    assert ask(url, seed=-1, max_tokens=5).status_code == 200


def test_stop_strings_end_the_reply(url: str) -> None:
    full = ask(url, seed=6, temperature=2, max_tokens=60).json()["choices"][0]["message"]["content"]
    cut = next((c for c in full[3:] if c.strip()), None)
    assert cut is not None, full
    stopped = ask(url, seed=6, temperature=2, max_tokens=60, stop=[cut, "zzzz"]).json()
    assert stopped["choices"][0]["message"]["content"] == full[: full.index(cut)].strip()
    assert stopped["choices"][0]["finish_reason"] == "stop"


def test_system_messages_are_dropped_and_history_is_used(url: str) -> None:
    user = {"role": "user", "content": "ciao"}
    plain = ask(url, messages=[user], seed=4).json()["choices"][0]["message"]
    system = {"role": "system", "content": "You are a pirate."}
    assert ask(url, messages=[system, user], seed=4).json()["choices"][0]["message"] == plain
    history = [{"role": "user", "content": "uno"}, {"role": "assistant", "content": "due"}, user]
    assert ask(url, messages=history, seed=4).json()["usage"]["prompt_tokens"] > len("ciao") + 3


def test_content_parts_and_unknown_characters(url: str) -> None:
    parts = [{"type": "text", "text": "ciao "}, {"type": "text", "text": "☃ 日本 🎉"}]
    reply = ask(url, messages=[{"role": "user", "content": parts}], seed=1)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
    same = ask(url, messages=[{"role": "user", "content": "ciao ☃ 日本 🎉"}], seed=1)
    assert same.json()["choices"] == reply.json()["choices"]  # the parts were joined, not dropped
    assert same.json()["usage"]["prompt_tokens"] == len("ciao ☃ 日本 🎉") + 3


def test_raw_event_stream_is_valid_utf8_sse(url: str) -> None:
    with httpx.stream("POST", url + "v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "àèìòù"}], "stream": True, "seed": 3, "max_tokens": 60,
        "temperature": 2,
    }) as response:  # fmt: skip
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_bytes())
    events = raw.decode("utf-8").split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    text = "".join(json.loads(e.removeprefix("data: "))["choices"][0]["delta"].get("content", "")
                   for e in events[:-2])  # fmt: skip
    assert text.strip() == ask(url, messages=[{"role": "user", "content": "àèìòù"}], seed=3, max_tokens=60,
                               temperature=2).json()["choices"][0]["message"]["content"]  # fmt: skip


# --- bad requests: a 4xx with OpenAI's JSON error body ------------------------------------------


BAD = [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 201}, "max_tokens"),
    ({"seed": 2**63}, "seed"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"stop": "x" * 65}, "stop"),
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"n": 0}, "n"),
    ({"n": 9}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x" * 501}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x" * 400}] * 6}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}] * 21}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"temperature": "hot"}, "temperature"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param"), BAD, ids=[p for _, p in BAD])
def test_bad_requests_get_400_with_a_json_error(url: str, body: dict[str, Any], param: str) -> None:
    response = ask(url, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"] and "\n" not in error["message"]


def test_bad_request_through_the_openai_client(url: str) -> None:
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                            temperature=3)  # fmt: skip


def test_broken_json_and_oversized_bodies(url: str) -> None:
    endpoint = url + "v1/chat/completions"
    for content, kind in ((b"messages=hi", "application/x-www-form-urlencoded"), (b"[]", "application/json")):
        wrong = httpx.post(endpoint, content=content, headers={"content-type": kind})
        assert (
            wrong.status_code == 400 and "Content-Type: application/json" in wrong.json()["error"]["message"]
        )
    broken = httpx.post(endpoint, content=b'{"messages": [', headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 1_100_000}]}).encode()
    assert httpx.post(endpoint, content=big, headers={"content-type": "application/json"}).status_code == 413

    def chunked() -> Iterator[bytes]:  # no Content-Length: the size is counted as it arrives
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(120):
            yield b"x" * 10_000
        yield b'"}]}'

    response = httpx.post(endpoint, content=chunked(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    wait_for(lambda: idle(url), "no answer to be running")  # none was started by these requests


# --- API key ------------------------------------------------------------------------------------


def test_api_key_guards_the_api_but_not_the_page() -> None:
    with running(tiny_chatbot(), serve.ServeConfig(api_key="sekret")) as base:
        for key in ("wrong", ""):
            with pytest.raises(openai.AuthenticationError):
                client(base, key or "x").models.list()
        no_header = httpx.post(base + "v1/chat/completions", json={"messages": []})
        assert no_header.status_code == 401 and no_header.json()["error"]["code"] == "invalid_api_key"
        odd = httpx.get(base + "v1/models", headers={"Authorization": "Bearer caf\u00e9".encode()})
        assert odd.status_code == 401  # a non-ASCII key is just a wrong key, not a crash
        good = client(base, "sekret").chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        assert good.choices[0].message.content
        assert httpx.get(base).status_code == 200 and httpx.get(base + "health").status_code == 200


def test_a_streamed_answer_arrives_as_it_is_generated() -> None:
    """The first character reaches the client while the rest is not yet drawn (the decoder holds
    it until the test releases it); the rest follows, with nothing lost between the chunks."""
    bot = tiny_chatbot()
    held = Scripted(bot.tokenizer, "abc", held=True)
    with running(bot, decoder=lambda: held) as base:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "stream": True}
        with httpx.stream("POST", base + "v1/chat/completions", json=body, timeout=30) as response:
            events = (line.removeprefix("data: ") for line in response.iter_lines() if line)
            texts = (json.loads(e)["choices"][0]["delta"].get("content") for e in events if e != "[DONE]")
            first = next(t for t in texts if t)
            assert first == "a" and held.produced == 1  # sent before the second character existed
            held.release()
            rest = "".join(t for t in texts if t)
    assert first + rest == "abc" * 10


# --- concurrency, queueing, disconnects, load ---------------------------------------------------


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


# --- the chat logic the server relies on ----------------------------------------------------------


def test_answer_leaves_the_bot_history_alone_and_reports_usage() -> None:
    bot = tiny_chatbot()
    bot.history = [Turn("user", "old")]
    info = ReplyInfo()
    sample = SampleConfig(max_new_tokens=4, temperature=1.0, seed=0)
    text = "".join(bot.answer([Turn("user", "ciao")], sample, info=info))
    assert bot.history == [Turn("user", "old")]
    assert info.prompt_tokens == len("ciao") + 3  # <|user|> ciao <|eot|> <|bot|>
    assert 1 <= info.completion_tokens <= 4 and len(text) <= 4
    assert info.finish_reason == ("length" if info.completion_tokens == 4 else "stop")


def test_answer_stops_at_a_request_stop_string() -> None:
    bot = tiny_chatbot()
    sample = SampleConfig(max_new_tokens=40, temperature=2.0, seed=9)
    full = "".join(bot.answer([Turn("user", "ciao")], sample))
    cut = next((c for c in full[1:] if c.strip()), None)
    if cut is None:
        pytest.skip("the sampled answer has no second visible character")
    stopped = "".join(bot.answer([Turn("user", "ciao")], sample, stop_strings=[cut]))
    assert stopped == full[: full.index(cut, 1)]


# --- the command ------------------------------------------------------------------------------------


def serve_cli(*args: object, cwd: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-m", "minigpt2", "serve", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_serve_command_runs_and_stops_on_ctrl_c(tmp_path: Path, one_line_error: Any) -> None:
    bot = tiny_chatbot()
    checkpoint.save(tmp_path / "mybot" / "best", bot.model, bot.tokenizer, {"chat_template": "dialogue"})
    proc = serve_cli("mybot", "--port", "0", "--max-concurrent", "1", cwd=tmp_path)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "serving mybot as 'mybot'" in line, line + (proc.stderr.read() if proc.poll() else "")
        base = line.split("web chat at ")[1].split(",")[0]
        reply = client(base).chat.completions.create(
            model="mybot", messages=[{"role": "user", "content": "ciao"}], max_tokens=5
        )
        assert reply.model == "mybot" and reply.choices[0].message.content
        port = base.rsplit(":", 1)[1].rstrip("/")
        clash = subprocess.run([sys.executable, "-m", "minigpt2", "serve", "mybot", "--port", port],
                               cwd=tmp_path, capture_output=True, text=True, timeout=60,
                               env=dict(os.environ, PYTHONPATH=str(SRC)))  # fmt: skip
        assert "already in use" in one_line_error(clash)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["mybot", "--max-concurrent", "0"], "max_concurrent must be >= 1"),
        (["mybot", "--max-queue", "-1"], "max_queue must be >= 0"),
        (["missing-run"], "missing-run"),
        (["mybot", "--host", "no-such-host.invalid"], "cannot listen on"),
        (["mybot", "--port", "70000"], "port must be in [0, 65535]"),
        (["mybot", "--api-key", ""], "--api-key is empty"),
        (["mybot", "--api-key", "clé-秘密"], "only printable ASCII"),
        (["mybot", "--api-key", " sekret"], "whitespace"),
        (["mybot", "--max-connections", "0"], "max_connections must be >= 1"),
        (["mybot", "--max-connections", "1000000000"], "file descriptors"),
        (["mybot", "--header-timeout", "0"], "header_timeout must be"),
        (["mybot", "--body-timeout", "nan"], "body_timeout must be"),
        (["mybot", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["--max-concurrent", "0"], "max_concurrent must be >= 1"),  # before training a default bot
    ],
)
def test_serve_command_bad_options_are_one_line_errors(
    tmp_path: Path, cli: Any, one_line_error: Any, args: list[str], expected: str
) -> None:
    bot = tiny_chatbot()
    checkpoint.save(tmp_path / "mybot" / "best", bot.model, bot.tokenizer, {"chat_template": "dialogue"})
    port = [] if "--port" in args else ["--port", "0"]
    assert expected in one_line_error(cli("serve", *args, *port, timeout=60))


def test_serve_and_quickstart_without_a_run_use_the_default_chatbot(tmp_path: Path, cli: Any) -> None:
    """`make serve` / `make chat` on a machine that already trained the default chatbot: no
    training, the run under runs/ is served (and chatted with) at once."""
    bot = tiny_chatbot()
    run = tmp_path / "runs" / "chat-chatterbot-english"
    checkpoint.save(run / "best", bot.model, bot.tokenizer, {"chat_template": "dialogue"})
    (run / "summary.json").write_text("{}", encoding="utf-8")  # training had finished
    chat = cli("quickstart", "--prompt", "ciao", "--max-new-tokens", "5", timeout=60)
    assert chat.returncode == 0 and "training" not in chat.stdout, chat.stdout + chat.stderr
    proc = serve_cli("--port", "0", cwd=tmp_path)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "as 'chat-chatterbot-english'" in line and "training" not in line, line
        base = line.split("web chat at ")[1].split(",")[0]
        assert httpx.get(base + "health").json()["model"] == "chat-chatterbot-english"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
