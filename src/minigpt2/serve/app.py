"""The app: ``create_app`` wires the endpoints, the error handlers and the middleware together.

Owns ``Routes`` (the endpoints of one app, as methods sharing its bot, limits and gate), the
exception handlers that turn every failure into OpenAI's ``{"error": {...}}`` JSON (a 405 keeps its
``Allow`` header), and the shape of the answers: a whole ``chat.completion``, or
``chat.completion.chunk`` server-sent events ending with ``data: [DONE]``. What a request may ask is
checked in ``schema``; how many answers run at once is ``admission``'s; which ``Host`` is answered,
``hosts``'; the socket and uvicorn are ``server``'s. There are no interactive docs at ``/docs``:
they load their scripts from a CDN, blank offline (``/openapi.json`` is served).

Tests: ``pytest tests/test_serve.py`` (the official ``openai`` client, raw HTTP, bad requests),
``tests/test_serve_http.py`` (methods, ``/docs``, Host names, keys) and ``tests/test_serve_browser.py``
(the page at ``/``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Generator
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from minigpt2.core.chat import Chatbot, ReplyInfo
from minigpt2.core.generate import make_generator
from minigpt2.errors import UserError
from minigpt2.serve.admission import BodyLimit, ClientGoneError, Gate, SlotResponse, pieces
from minigpt2.serve.descriptors import OUT_OF_DESCRIPTORS, out_of_descriptors
from minigpt2.serve.hosts import HostCheck
from minigpt2.serve.schema import LIMITS, ApiError, ChatRequest, ServeConfig, sampling, stop_strings, to_turns

log = logging.getLogger(__name__)


def create_app(bot: Chatbot, limits: ServeConfig | None = None) -> FastAPI:
    """The ASGI app serving ``bot``. Run it with uvicorn (``minigpt2 serve`` does)."""
    limits = limits or ServeConfig()
    routes = Routes(bot, limits)
    app = FastAPI(title="minigpt2", summary="An OpenAI-compatible API for a character-level GPT-2",
                  docs_url=None, redoc_url=None)  # fmt: skip
    app.state.gate, app.state.limits = routes.gate, limits
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

    def __init__(self, bot: Chatbot, limits: ServeConfig) -> None:
        self.bot, self.limits = bot, limits
        self.gate = Gate(limits.max_concurrent, limits.max_queue)
        # OpenAI's model object, plus what the web page needs to start its controls from: the sampling
        # defaults and the limits this server was started with (clients ignore unknown fields).
        self.model_card = {
            "id": limits.model_id, "object": "model", "created": int(time.time()), "owned_by": "minigpt2",
            "defaults": {"temperature": bot.sample.temperature, "top_k": bot.sample.top_k,
                         "top_p": bot.sample.top_p, "max_tokens": limits.default_max_tokens},
            "limits": {name: getattr(limits, name) for name in LIMITS},
        }  # fmt: skip

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
        html = resources.files("minigpt2.serve").joinpath("static/chat.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    async def health(self) -> dict[str, Any]:
        gate = self.gate
        return {"status": "ok", "model": self.limits.model_id, "active": gate.active, "waiting": gate.waiting}

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
        info = ReplyInfo()
        answer = self.bot.answer(turns, sample, generator=make_generator(sample.seed),
                                 stop_strings=stop_strings(body), info=info)  # fmt: skip
        try:
            leave = await self.gate.enter(request.is_disconnected)
        except ClientGoneError:  # nobody will read this; the slot it waited for goes to the next request
            return JSONResponse({"error": {"message": "the client went away", "type": "client_gone"}}, 408)
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": self.limits.model_id,
        }
        if body.stream:
            with_usage = body.stream_options is not None and body.stream_options.include_usage
            return SlotResponse(self._events(answer, info, head, with_usage), leave)
        return await self._whole(answer, info, head, request, leave)

    async def _events(
        self, answer: Generator[str, None, None], info: ReplyInfo, head: dict[str, Any], with_usage: bool
    ) -> AsyncIterator[str]:
        """The answer as ``chat.completion.chunk`` events: the role, each piece, the finish reason."""
        chunk = {**head, "object": "chat.completion.chunk", "system_fingerprint": None}
        yield chunk_event(chunk, {"role": "assistant", "content": ""})
        try:
            async with contextlib.aclosing(pieces(answer, self.gate.limiter)) as stream:
                async for piece in stream:
                    yield chunk_event(chunk, {"content": piece})
        except Exception as err:  # the headers are sent: report it in the stream, then end
            log.exception("generation failed")
            yield sse({"error": {"message": f"internal error: {err}", "type": "server_error"}})
            return
        yield chunk_event(chunk, {}, info.finish_reason)
        if with_usage:
            yield sse({**chunk, "choices": [], "usage": usage(info)})
        yield sse("[DONE]")

    async def _whole(
        self,
        answer: Generator[str, None, None],
        info: ReplyInfo,
        head: dict[str, Any],
        request: Request,
        leave: Callable[[], None],
    ) -> JSONResponse:
        """The answer as one ``chat.completion``; the slot is freed as soon as generation ends."""
        text = []
        try:
            async with contextlib.aclosing(pieces(answer, self.gate.limiter)) as stream:
                async for piece in stream:
                    text.append(piece)
                    if await request.is_disconnected():  # nobody is waiting for the rest
                        break
        finally:
            leave()
        message = {"role": "assistant", "content": "".join(text)}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": info.finish_reason}
        return JSONResponse({**head, "object": "chat.completion", "choices": [choice],
                             "usage": usage(info), "system_fingerprint": None})  # fmt: skip


def usage(info: ReplyInfo) -> dict[str, int]:
    """OpenAI's token counts of a finished answer (read once generation is over)."""
    return {"prompt_tokens": info.prompt_tokens, "completion_tokens": info.completion_tokens,
            "total_tokens": info.prompt_tokens + info.completion_tokens}  # fmt: skip


def chunk_event(chunk: dict[str, Any], delta: dict[str, str], finish: str | None = None) -> str:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return sse({**chunk, "choices": [choice]})


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"
