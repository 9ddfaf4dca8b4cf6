"""``minigpt2 serve``: the OpenAI-compatible API, tested with real clients over loopback.

The official ``openai`` package talks to a real uvicorn server (plain and streaming replies), httpx
sends the bad requests and the raw event stream. The queue, clients that leave and 20 concurrent
streams are ``test_serve_queue.py``'s; the ``minigpt2 serve`` command as a process
``test_serve_cli.py``'s. What batching itself promises (the same answer alone or among others, rows
that leave at once, ``n``) is ``test_serve_batch.py``'s. Connections are
``test_serve_connections.py``'s, Host names, methods and key rules ``test_serve_http.py``'s, the
browser ``test_serve_browser.py``'s.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from helpers_serve import Scripted, ask, client, idle, running, tiny_chatbot, wait_for
from minigpt2 import serve
from minigpt2.core.chat import Turn
from minigpt2.core.config import SampleConfig
from minigpt2.core.stream import ReplyInfo


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """One server for the read-only tests of this module (default limits, no API key)."""
    limits = serve.ServeConfig(max_tokens=200, max_message_chars=500, max_history_chars=2000, max_messages=20)
    with running(tiny_chatbot(), limits) as base:
        yield base


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
    assert card["defaults"]["temperature"] == 1.0 and card["defaults"]["seed"] is None
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
