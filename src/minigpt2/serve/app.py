"""The app: ``create_app`` wires the endpoints, the error handlers and the middleware together.

Owns ``Routes`` (the endpoints of one app, as methods sharing its bot, limits, gate and engine), the
exception handlers that turn every failure into OpenAI's ``{"error": {...}}`` JSON (a 405 keeps its
``Allow`` header), and the shape of the answers: a whole ``chat.completion`` with one choice per
``n``, or ``chat.completion.chunk`` server-sent events (each carrying its choice's ``index``) ending
with ``data: [DONE]``. What a request may ask is checked in ``schema``; how many answers run at once
is ``admission``'s; the decoding thread that advances them all together is ``engine``'s, started and
stopped with the app (its lifespan), and their text ``replies``' (made on the event loop, which runs
everything but the model's steps); which ``Host`` is answered, ``hosts``'; the socket and uvicorn
are ``server``'s. There are no interactive docs at ``/docs``: they load their scripts from a CDN,
blank offline (``/openapi.json`` is served).

Tests: ``pytest tests/serve/test_serve.py`` (the official ``openai`` client, raw HTTP, bad requests),
``tests/serve/test_serve_batch.py`` (``n``, answers among others), ``tests/serve/test_serve_http.py``
(methods,
``/docs``, Host names, keys) and ``tests/serve/test_serve_browser.py`` (the page at ``/``).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from minigpt2.core.chat import Chatbot
from minigpt2.errors import UserError
from minigpt2.serve.admission import BodyLimit, ClientGoneError, Gate, SlotResponse
from minigpt2.serve.config import LIMITS, ServeConfig
from minigpt2.serve.descriptors import OUT_OF_DESCRIPTORS, out_of_descriptors
from minigpt2.serve.engine import Decoder, Engine
from minigpt2.serve.hosts import HostCheck
from minigpt2.serve.replies import Reply
from minigpt2.serve.schema import ApiError, ChatRequest, choices, sampling, stop_strings, to_turns

log = logging.getLogger(__name__)


def create_app(
    bot: Chatbot, limits: ServeConfig | None = None, decoder: Callable[[], Decoder] | None = None
) -> FastAPI:
    """The ASGI app serving ``bot``. Run it with uvicorn (``minigpt2 serve`` does). ``decoder`` makes
    the batched decoder the answers are drawn from (default: a ``BatchDecoder`` over ``bot.model``
    with ``max_concurrent`` rows); tests give one that paces or scripts its steps."""
    limits = limits or ServeConfig()
    routes = Routes(bot, limits, decoder)
    app = FastAPI(title="minigpt2", summary="An OpenAI-compatible API for a character-level GPT-2",
                  docs_url=None, redoc_url=None, lifespan=routes.lifespan)  # fmt: skip
    app.state.gate, app.state.limits, app.state.engine = routes.gate, limits, routes.engine
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    if limits.allowed_hosts:  # added last, so it runs first: a refused Host gets nothing else
        app.add_middleware(HostCheck, allowed=limits.allowed_hosts)
    add_error_handlers(app)
    routes.add_to(app)
    return app


# --- errors: every one leaves as OpenAI's {"error": {...}} JSON ---


def add_error_handlers(app: FastAPI) -> None:
    app.exception_handler(ApiError)(api_error)
    app.exception_handler(RequestValidationError)(invalid)
    app.exception_handler(OSError)(os_error)
    app.exception_handler(Exception)(internal)
    app.exception_handler(StarletteHTTPException)(http_error)


async def api_error(request: Request, err: ApiError) -> JSONResponse:
    return err.response()


async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
    """A request body pydantic rejected, reported as one field's error as OpenAI does."""
    first = err.errors()[0] if err.errors() else {}
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON").response()
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    if where is None:  # the body as a whole: missing, not an object, or not sent as JSON
        return ApiError(400, "send a JSON object with Content-Type: application/json").response()
    return ApiError(400, f"{where}: {first.get('msg', 'invalid value')}", where).response()


async def internal(request: Request, err: Exception) -> JSONResponse:
    log.exception("request failed")
    return JSONResponse({"error": {"message": f"internal error: {err}", "type": "server_error",
                                   "param": None, "code": None}}, status_code=500)  # fmt: skip


async def os_error(request: Request, err: OSError) -> JSONResponse:
    """An error of the operating system. Out of file descriptors, every request fails alike: one
    line now and then, not a traceback each (a handler of its own class, unlike ``Exception``'s,
    is not followed by Starlette re-raising the error to uvicorn, which would log it again)."""
    if out_of_descriptors(err):
        OUT_OF_DESCRIPTORS()
        return ApiError(503, "the server is out of file descriptors; try again shortly").response()
    return await internal(request, err)


async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (404, 405 with its ``Allow`` header, and the 413 ``BodyLimit`` raises
    mid-body) in OpenAI's shape."""
    code = "request_too_large" if err.status_code == 413 else None
    response = ApiError(err.status_code, str(err.detail), code=code).response()
    response.headers.update(err.headers or {})
    return response


# --- the endpoints ---


class Routes:
    """The endpoints of one app; the bot, the limits and the gate are shared by all its requests."""

    def __init__(
        self, bot: Chatbot, limits: ServeConfig, decoder: Callable[[], Decoder] | None = None
    ) -> None:
        self.bot, self.limits = bot, limits
        self.gate = Gate(limits.max_concurrent, limits.max_queue)
        self.engine = Engine(decoder or (lambda: batch_decoder(bot, limits.max_concurrent)))
        # OpenAI's model object, plus what the web page needs to start its controls from: the sampling
        # defaults and the limits this server was started with (clients ignore unknown fields).
        self.model_card = {
            "id": limits.model_id, "object": "model", "created": int(time.time()), "owned_by": "minigpt2",
            "defaults": {"temperature": bot.sample.temperature, "top_k": bot.sample.top_k,
                         "top_p": bot.sample.top_p, "max_tokens": limits.default_max_tokens,
                         "seed": bot.sample.seed},
            "limits": {name: getattr(limits, name) for name in LIMITS},
        }  # fmt: skip

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self.engine.start()
        try:
            yield
        finally:
            self.engine.stop()

    def add_to(self, app: FastAPI) -> None:
        guarded = [Depends(self.authorised)]
        # HEAD too: uptime checks and `curl -I` send it. One route each, so that a 405 lists both in
        # Allow; out of /openapi.json, which describes the API (and would list one operation twice).
        get = ["GET", "HEAD"]
        app.api_route("/", methods=get, response_class=HTMLResponse, include_in_schema=False)(self.page)
        app.api_route("/health", methods=get, include_in_schema=False)(self.health)
        app.get("/v1/models", dependencies=guarded)(self.models)
        app.get("/v1/models/{model_id}", dependencies=guarded)(self.model)
        app.post("/v1/chat/completions", dependencies=guarded, response_model=None)(self.completions)

    async def authorised(self, request: Request) -> None:
        if self.limits.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # The bytes as sent (Starlette decodes headers as Latin-1); the key is printable ASCII.
        given, wanted = token.strip().encode("latin-1"), self.limits.api_key.encode("ascii")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given, wanted):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                           code="invalid_api_key")  # fmt: skip

    async def page(self) -> HTMLResponse:
        # Read per request, not cached: an edited page shows on reload without restarting the server.
        return HTMLResponse(chat_page(), headers={"Cache-Control": "no-cache"})

    async def health(self) -> dict[str, Any]:
        # active: requests being answered; waiting: queued; rows: rows of the batch generating now.
        gate = self.gate
        return {"status": "ok", "model": self.limits.model_id, "active": gate.active, "waiting": gate.waiting,
                "rows": self.engine.running}  # fmt: skip

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card]}

    async def model(self, model_id: str) -> dict[str, Any]:
        if model_id != self.limits.model_id:
            raise ApiError(404, f"no model {model_id!r}; this server has {self.limits.model_id!r}", "model",
                           "model_not_found")  # fmt: skip
        return self.model_card

    async def completions(self, body: ChatRequest, request: Request) -> JSONResponse | SlotResponse:
        # Every check runs before a slot is taken, so a bad request never waits in the queue. (A comment,
        # not a docstring: FastAPI would publish a docstring as the endpoint's OpenAPI description.)
        turns = to_turns(body, self.limits)
        try:
            sample = sampling(body, self.bot, self.limits)
        except UserError as err:  # SampleConfig's own checks, e.g. a non-finite number
            raise ApiError(400, str(err)) from None
        n, stops = choices(body, self.limits), stop_strings(body)
        try:
            leave = await self.gate.enter(request.is_disconnected, need=n)
        except ClientGoneError:  # nobody will read this; the slot it waited for goes to the next request
            return JSONResponse({"error": {"message": "the client went away", "type": "client_gone"}}, 408)
        try:
            reply = Reply(self.bot, self.engine, turns, sample, stops, n, self.limits.stream_interval)
        except BaseException:
            leave()
            raise

        def done() -> None:  # the rows first: a request let in by leave() finds them free
            reply.close()
            leave()

        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": self.limits.model_id,
        }
        if body.stream:
            with_usage = body.stream_options is not None and body.stream_options.include_usage
            return SlotResponse(self._events(reply, head, with_usage), done)
        return await self._whole(reply, head, request, done)

    async def _events(self, reply: Reply, head: dict[str, Any], with_usage: bool) -> AsyncIterator[str]:
        """The answers as ``chat.completion.chunk`` events: each choice's role, its pieces as they
        come (``index`` says whose), its finish reason once it ends; then the usage if asked."""
        chunk = {**head, "object": "chat.completion.chunk", "system_fingerprint": None}
        for index in range(len(reply.infos)):
            yield chunk_event(chunk, index, {"role": "assistant", "content": ""})
        try:
            async for index, piece in reply.pieces():
                if piece is None:
                    yield chunk_event(chunk, index, {}, reply.infos[index].finish_reason)
                else:
                    yield chunk_event(chunk, index, {"content": piece})
        except Exception as err:  # the headers are sent: report it in the stream, then end
            log.exception("generation failed")
            yield sse({"error": {"message": f"internal error: {err}", "type": "server_error"}})
            return
        if with_usage:
            yield sse({**chunk, "choices": [], "usage": reply.usage()})
        yield sse("[DONE]")

    async def _whole(
        self, reply: Reply, head: dict[str, Any], request: Request, done: Callable[[], None]
    ) -> JSONResponse:
        """The answers as one ``chat.completion``; the slots are freed as soon as generation ends."""
        try:
            texts = await reply.whole(lambda: disconnect(request))
        finally:
            done()
        answers = [
            {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
             "finish_reason": info.finish_reason}
            for i, (text, info) in enumerate(zip(texts, reply.infos, strict=True))
        ]  # fmt: skip
        return JSONResponse({**head, "object": "chat.completion", "choices": answers, "usage": reply.usage(),
                             "system_fingerprint": None})  # fmt: skip


async def disconnect(request: Request) -> None:
    """Returns once the client has gone (its request body is read: what comes next is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def chat_page() -> str:
    """The web chat: ``static/chat.html`` with the screen it shares with the exported page
    (``minigpt2/exports/web/chat_ui.js``) in place of its CHAT_UI mark."""
    package = resources.files("minigpt2")
    page = package.joinpath("serve/static/chat.html").read_text(encoding="utf-8")
    screen = package.joinpath("exports/web/chat_ui.js").read_text(encoding="utf-8")
    # Inside <script>, these would end the element (or change how the parser reads it).
    assert page.count("{{CHAT_UI}}") == 1 and not re.search(r"</script|<!--", screen, re.IGNORECASE)
    return page.replace("{{CHAT_UI}}", screen)


def batch_decoder(bot: Chatbot, rows: int) -> Decoder:
    """The decoder the answers are drawn from: ``rows`` generations over ``bot.model`` in one pass."""
    from minigpt2.fast.batch_decoder import BatchDecoder

    return BatchDecoder(bot.model, max_rows=rows, precision=bot.precision)


def chunk_event(chunk: dict[str, Any], index: int, delta: dict[str, str], finish: str | None = None) -> str:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return sse({**chunk, "choices": [choice]})


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"
