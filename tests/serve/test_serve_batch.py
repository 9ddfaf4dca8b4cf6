"""``minigpt2 serve`` on the batched engine: every running answer advances in one model step.

Each request keeps its own options and generator, so its answer is the one ``Chatbot.answer``
(``generate_ids``, one conversation alone) gives: checked for a greedy and a seeded sampled request
among 20 others, and for rows of different lengths, stop strings and options started together.
``helpers_serve.Paced`` wraps the real decoder so that the tests decide when a step runs: rows are
gathered before the first step (so they really share it), and a client that leaves is seen to free
its row while no step is allowed. OpenAI's ``n`` runs as n rows (seeds seed, seed + 1, ...).
Nothing waits for a sleep: ``wait_for`` polls the server's state under a generous deadline.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from helpers_serve import Paced, health, running, tiny_chatbot, wait_for
from minigpt2 import serve
from minigpt2.core.chat import Chatbot, DialogueTemplate
from minigpt2.core.generate import make_generator
from minigpt2.core.stream import ReplyInfo
from minigpt2.serve.schema import ChatRequest, sampling, stop_strings, to_turns

LIMITS = serve.ServeConfig(max_concurrent=24, max_tokens=1000)


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "v1", api_key="unused", max_retries=0, timeout=60)


def arguments(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` as the official client's arguments (messages default to one; options outside
    OpenAI's API, such as top_k, go in ``extra_body``)."""
    extra = {k: body[k] for k in ("top_k", "repetition_penalty") if k in body}
    given = {k: v for k, v in body.items() if k not in extra}
    return {"model": "m", "messages": [{"role": "user", "content": "ciao"}], **given, "extra_body": extra}


def ask(base: str, body: dict[str, Any]) -> dict[str, Any]:
    """The whole answer to ``body``, through the official client."""
    return client(base).chat.completions.create(**arguments(body)).model_dump()


def streamed(base: str, body: dict[str, Any]) -> dict[int, str]:
    """Each choice's text, streamed through the official client, by its index."""
    texts: dict[int, str] = {}
    for chunk in client(base).chat.completions.create(**{**arguments(body), "stream": True}):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    return texts


def expected(bot: Chatbot, body: dict[str, Any]) -> tuple[str, ReplyInfo]:
    """What ``Chatbot.answer`` says to ``body`` alone, with the options the server makes of it."""
    request = ChatRequest(**{"messages": [{"role": "user", "content": "ciao"}], **body})
    sample = sampling(request, bot, LIMITS)
    info = ReplyInfo()
    text = "".join(bot.answer(to_turns(request, LIMITS), sample, generator=make_generator(sample.seed),
                              stop_strings=stop_strings(request), info=info))  # fmt: skip
    return text, info


def others(count: int) -> Iterator[dict[str, Any]]:
    """Requests unlike each other: their own messages, lengths, options and seeds."""
    for i in range(count):
        yield {"messages": [{"role": "user", "content": f"messaggio numero {i} " * (1 + i % 3)}],
               "max_tokens": 5 + 9 * i, "temperature": (i % 4) * 0.5, "seed": 100 + i,
               "top_k": i % 5, "stop": ["q"] if i % 3 == 0 else None}  # fmt: skip


def together(base: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All of ``bodies`` at once (every other one streamed); each answer's text and usage."""

    def one(i: int) -> dict[str, Any]:
        if i % 2:
            return {"text": streamed(base, bodies[i])[0]}
        reply = ask(base, bodies[i])
        return {"text": reply["choices"][0]["message"]["content"], "reply": reply}

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, range(len(bodies))))


@pytest.mark.parametrize(
    "options",
    [{"temperature": 0, "max_tokens": 60}, {"temperature": 1.3, "top_k": 12, "top_p": 0.9, "seed": 11}],
    ids=["greedy", "seeded"],
)
def test_an_answer_is_the_same_alone_and_among_twenty_others(options: dict[str, Any]) -> None:
    bot = tiny_chatbot(seed=3)
    paced = Paced(bot, LIMITS.max_concurrent, unlimited=True)
    target = {"messages": [{"role": "user", "content": "come stai oggi?"}], **options}
    with running(bot, LIMITS, decoder=lambda: paced) as base:
        alone = ask(base, target)["choices"][0]["message"]["content"]
        assert alone == expected(bot, target)[0] and alone
        paced.gather = 21  # the first step waits for all 21: the target starts among the 20 others
        answers = together(base, [*others(10), target, *others(10)])
        assert paced.most == 21
    assert answers[10]["text"] == alone


def test_rows_of_different_lengths_stop_strings_and_options_do_not_leak() -> None:
    bot = tiny_chatbot(seed=5)
    bodies = list(others(16))
    for body in bodies[::4]:  # stop strings that do cut these answers: a character from each one
        full = expected(bot, {**body, "stop": None})[0]
        body["stop"] = [next((c for c in full[3:] if c.strip()), "zz"), "xyz"]
    paced = Paced(bot, LIMITS.max_concurrent, unlimited=True, gather=len(bodies))
    with running(bot, LIMITS, decoder=lambda: paced) as base:
        answers = together(base, bodies)
        assert paced.most == len(bodies)
        wait_for(lambda: health(base)["rows"] == 0, "every row to leave")
    for body, answer in zip(bodies, answers, strict=True):
        text, info = expected(bot, body)
        assert answer["text"] == text, body
        if "reply" in answer:
            assert answer["reply"]["choices"][0]["finish_reason"] == info.finish_reason
            assert answer["reply"]["usage"]["completion_tokens"] == info.completion_tokens
            assert answer["reply"]["usage"]["prompt_tokens"] == info.prompt_tokens


def endless_chatbot() -> Chatbot:
    """A tiny chatbot whose answers never end by themselves (no stop ids): only at max_tokens."""
    bot = tiny_chatbot(seed=2)
    bot.template = DialogueTemplate(stop_ids=())
    return bot


def test_a_client_that_disconnects_frees_its_row_before_the_next_step() -> None:
    bot = endless_chatbot()
    paced = Paced(bot, 4)
    body = {"messages": [{"role": "user", "content": "parla"}], "max_tokens": 200, "stream": True}
    with running(bot, serve.ServeConfig(max_concurrent=4, max_tokens=200), decoder=lambda: paced) as base:
        with httpx.stream("POST", base + "v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()  # kept: dropping the iterator would close the connection
            next(lines)  # the role chunk: the answer is running
            paced.allow(3)
            wait_for(lambda: paced.steps == 3 and health(base)["rows"] == 1, "three steps of the answer")
        # The client has gone; no step is allowed from now on, so the row can only leave by cancel.
        wait_for(lambda: health(base)["rows"] == 0, "the row to leave", seconds=60)
        assert health(base)["active"] == 0 and paced.steps == 3


def test_an_answer_cut_by_a_stop_string_leaves_its_row_long_before_max_tokens() -> None:
    bot = endless_chatbot()
    full = expected(bot, {"max_tokens": 40, "temperature": 0})[0]
    stop = next(c for i, c in enumerate(full) if i >= 3 and c.strip() and c not in full[:i])
    # A stop string is read by the answer's text task within one stream interval, while the row
    # goes on stepping; a bound of 20,000 steps leaves that task seconds, not milliseconds.
    body = {"max_tokens": 20_000, "temperature": 0, "stop": [stop]}
    paced = Paced(bot, 4, unlimited=True)
    limits = serve.ServeConfig(max_concurrent=4, max_tokens=20_000)
    with running(bot, limits, decoder=lambda: paced) as base:
        reply = ask(base, body)
        assert reply["choices"][0]["finish_reason"] == "stop"
        assert reply["choices"][0]["message"]["content"] == full[: full.index(stop)].strip()
        wait_for(lambda: health(base)["rows"] == 0, "the row to leave")
        assert paced.steps < 20_000  # it left once its text ended, not at its max_tokens


def test_n_choices_run_as_rows_with_consecutive_seeds() -> None:
    bot = tiny_chatbot(seed=4)
    body = {"n": 3, "seed": 21, "temperature": 1.2, "max_tokens": 50}
    with running(bot, LIMITS) as base:
        first, again = ask(base, body), ask(base, body)
        texts = [c["message"]["content"] for c in first["choices"]]
        assert [c["index"] for c in first["choices"]] == [0, 1, 2]
        assert [c["message"]["content"] for c in again["choices"]] == texts
        assert len(set(texts)) > 1  # three draws, not one answer three times
        singles = [ask(base, {**body, "n": 1, "seed": 21 + i}) for i in range(3)]
        assert texts == [s["choices"][0]["message"]["content"] for s in singles]
        assert [c["finish_reason"] for c in first["choices"]] == [
            s["choices"][0]["finish_reason"] for s in singles
        ]
        usage = first["usage"]  # the prompt once, the answers summed
        assert usage["completion_tokens"] == sum(s["usage"]["completion_tokens"] for s in singles)
        assert usage["prompt_tokens"] == singles[0]["usage"]["prompt_tokens"]
        assert streamed(base, body) == dict(enumerate(texts))
        wait_for(lambda: health(base)["rows"] == 0, "the rows to leave")


def test_n_streams_each_choice_with_its_index_and_finish_reason() -> None:
    body = {"messages": [{"role": "user", "content": "ciao"}], "n": 2, "seed": 3, "max_tokens": 30,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with running(tiny_chatbot(), LIMITS) as base:
        with httpx.stream("POST", base + "v1/chat/completions", json=body, timeout=30) as response:
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        roles = [
            c["choices"][0]["index"] for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]
        ]
        finishes = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert roles == [0, 1] and sorted(f["index"] for f in finishes) == [0, 1]
        plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        whole = httpx.post(base + "v1/chat/completions", json=plain, timeout=30).json()
        assert chunks[-1]["usage"] == whole["usage"]


@pytest.mark.parametrize("n", [0, 3, 9])
def test_n_is_bounded_by_the_rows(n: int) -> None:
    with running(tiny_chatbot(), serve.ServeConfig(max_concurrent=2)) as base:
        reply = httpx.post(base + "v1/chat/completions", timeout=30,
                           json={"messages": [{"role": "user", "content": "x"}], "n": n})  # fmt: skip
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "n"
        assert reply.json()["error"]["message"] == f"n must be in [1, 2], got {n}"


@pytest.mark.parametrize(
    ("hostile", "status"),
    [
        ({"temperature": 1e-300}, 200),
        ({"temperature": 1e-40}, 200),
        ({"top_p": 1e-46}, 200),
        ({"repetition_penalty": 1e-40}, 400),
    ],
    ids=["temperature-1e-300", "temperature-1e-40", "top_p-1e-46", "repetition_penalty-1e-40"],
)
def test_settings_too_small_to_compute_with_hurt_no_other_answer(
    hostile: dict[str, Any], status: int
) -> None:
    bot = tiny_chatbot(seed=6)
    victims = [{"messages": [{"role": "user", "content": f"ciao {i}"}], "max_tokens": 30, "seed": i,
                "temperature": 1.0} for i in range(3)]  # fmt: skip
    attack = {"messages": [{"role": "user", "content": "ciao"}], "max_tokens": 30, "seed": 5, **hostile}
    paced = Paced(bot, 8, unlimited=True, gather=3 + (status == 200))  # they share their steps
    with running(bot, LIMITS, decoder=lambda: paced) as base:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(streamed, base, body) for body in victims]
            reply = pool.submit(httpx.post, base + "v1/chat/completions", json=attack, timeout=60).result()
            texts = [s.result()[0] for s in streams]
        assert reply.status_code == status, reply.text
        if status == 200:  # too small to compute with: greedy, the likeliest character each time
            greedy = expected(bot, {**attack, "temperature": 0, "top_p": 1})[0]
            assert reply.json()["choices"][0]["message"]["content"] == greedy
        else:
            assert reply.json()["error"]["param"] == next(iter(hostile))
        assert health(base)["active"] <= 1  # the server still answers
    assert texts == [expected(bot, body)[0] for body in victims]
