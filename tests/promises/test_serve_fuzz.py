"""The HTTP API fuzzed from its own OpenAPI description (Schemathesis), against a real server.

Schemathesis reads ``/openapi.json`` from a server on 127.0.0.1 and draws requests for every
operation: valid ones (the schema's types and ranges) and invalid ones (wrong types, missing
fields, values out of range). For all of them: no 5xx, and a streamed answer ends with ``[DONE]``
(never a dropped stream). A stream started with the fuzzing, on a connection of its own, must end
normally with the answer the same request gets alone. Bounded: a few dozen examples per operation and
mode, answers of at most 12 characters; no deadline, so a busy machine only makes it slower.
Run with ``pytest tests/promises/test_serve_fuzz.py``.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from helpers_serve import running, tiny_chatbot
from minigpt2 import serve

LIMITS = serve.ServeConfig(max_tokens=12, default_max_tokens=12, max_concurrent=8, max_queue=64)
VALID, INVALID = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
# Every operation with what the schema allows; the chat endpoint also with what it forbids (the
# models' only parameter is a path segment: any string is allowed).
CASES = [("POST", "/v1/chat/completions", VALID), ("POST", "/v1/chat/completions", INVALID),
         ("GET", "/v1/models", VALID), ("GET", "/v1/models/{model_id}", VALID)]  # fmt: skip


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with running(tiny_chatbot(), LIMITS) as url:
        yield url


@pytest.fixture(scope="module")
def schema(base: str) -> Any:
    return schemathesis.openapi.from_url(base + "openapi.json")


def check(response: Any) -> None:
    """No server error; a stream that started ends with ``[DONE]``."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    kind = response.headers.get("content-type", "")
    kind = kind[0] if isinstance(kind, list) else kind  # Schemathesis keeps each header as a list
    if response.status_code == 200 and kind.startswith("text/event-stream"):
        events = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "data: [DONE]", response.text[-500:]


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_no_request_the_schema_allows_or_forbids_breaks_the_server(
    base: str, schema: Any, method: str, path: str, mode: GenerationMode
) -> None:
    operation = schema[path][method]
    body = {"messages": [{"role": "user", "content": "ciao"}], "max_tokens": 12, "stream": True, "seed": 3}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a stream beside the fuzzing
        beside = pool.submit(httpx.post, base + "v1/chat/completions", json=body, timeout=120)

        @settings(max_examples=30, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: Any) -> None:
            check(case.call(base_url=base.rstrip("/"), timeout=60))

        fuzz()
        stream = beside.result()
    check(stream)
    alone = httpx.post(base + "v1/chat/completions", json=body, timeout=120)
    assert _text(stream) == _text(alone)


def _text(response: httpx.Response) -> str:
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: {")]
    return "".join(c["delta"].get("content") or "" for e in events for c in json.loads(e)["choices"])
