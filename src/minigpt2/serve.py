"""The chatbot over HTTP: an OpenAI-compatible chat-completions API and a one-page web chat.

Only transport lives here. The conversation logic is ``Chatbot.answer`` (``minigpt2.chat``): the
server turns OpenAI ``messages`` into ``Turn``s, asks for the next bot turn, and sends it back whole
or as server-sent events. Endpoints:

- ``POST /v1/chat/completions``: ``messages`` in, the reply out; ``"stream": true`` sends
  ``chat.completion.chunk`` events and ends with ``data: [DONE]``, as OpenAI's API does.
- ``GET /v1/models``, ``GET /v1/models/{id}``: the one model this server holds.
- ``GET /health``: liveness and load (answers being generated, requests waiting).
- ``GET /``: the web chat page (``static/chat.html``: no build step, no external assets).

What keeps it standing: request bodies, messages, histories and ``max_tokens`` are bounded and
sampling options range-checked (400/413 with an OpenAI-style JSON error); at most ``max_concurrent``
answers are generated at once, up to ``max_queue`` more wait, and the rest get 429; a client that
disconnects stops its generation; an optional API key (Bearer) guards ``/v1``. The model runs in
worker threads (torch releases the GIL), so the event loop keeps serving while answers are made.

Tests: ``pytest tests/test_serve.py`` (the official ``openai`` client, a load test, bad requests)
and ``tests/test_serve_browser.py`` (headless Chromium, driven by Playwright).
"""

from __future__ import annotations

import errno
import json
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from minigpt2.chat import Chatbot, ReplyInfo, Turn
from minigpt2.config import SampleConfig
from minigpt2.errors import ConfigError, UserError
from minigpt2.generate import make_generator

if TYPE_CHECKING:
    import uvicorn


@dataclass
class ServeConfig:
    """Limits of ``minigpt2 serve``; every one is a command-line option of the same name."""

    max_message_chars: int = 4000  # one message's text
    max_history_chars: int = 32000  # all messages of one request together
    max_messages: int = 200  # messages in one request
    max_tokens: int = 1000  # the most characters one answer may ask for
    default_max_tokens: int = 300  # when the request does not say (`serve --max-new-tokens`); <= max_tokens
    max_concurrent: int = 2  # answers generated at the same time
    max_queue: int = 32  # requests waiting for a free slot before the next ones get 429
    max_body_bytes: int = 1_000_000  # request bodies larger than this get 413
    api_key: str | None = None  # when set, /v1 needs "Authorization: Bearer <api_key>"
    model_id: str = "minigpt2"  # the name /v1/models reports

    def __post_init__(self) -> None:
        for name in (*LIMITS, "default_max_tokens"):
            if name != "max_queue" and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ConfigError(f"max_queue must be >= 0, got {self.max_queue}")
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens)
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key is empty; give a key or leave it out")


# The ServeConfig fields that are plain integer limits (command-line options of the same name).
LIMITS = ("max_message_chars", "max_history_chars", "max_messages", "max_tokens", "max_concurrent",
          "max_queue", "max_body_bytes")  # fmt: skip


class ApiError(Exception):
    """An error the client caused (or a full server): sent as OpenAI's ``{"error": {...}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
        body = {"message": self.message, "type": kind.get(self.status, "invalid_request_error"),
                "param": self.param, "code": self.code}  # fmt: skip
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse({"error": body}, status_code=self.status, headers=headers)


# --- the request, as OpenAI's chat-completions API defines it (fields we do not use are ignored) ---


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not in OpenAI's API; llama.cpp and vLLM accept it too
    repetition_penalty: float | None = None  # likewise
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None


def message_text(message: ChatMessage, index: int) -> str:
    """The text of one message: a string, or the ``text`` parts of a list of content parts."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    if any(part.type != "text" for part in message.content):
        raise ApiError(400, "only text content is supported", f"messages[{index}].content")
    return "".join(part.text or "" for part in message.content)


def to_turns(request: ChatRequest, limits: ServeConfig) -> list[Turn]:
    """OpenAI messages as chat turns. System and developer messages are dropped: a character-level
    model trained on dialogue has no notion of instructions, and their text would read as a turn."""
    if not request.messages:
        raise ApiError(400, "messages must hold at least one message", "messages")
    if len(request.messages) > limits.max_messages:
        raise ApiError(400, f"too many messages ({len(request.messages)}); at most {limits.max_messages}",
                       "messages")  # fmt: skip
    turns, total = [], 0
    for i, message in enumerate(request.messages):
        text = message_text(message, i)
        if len(text) > limits.max_message_chars:
            limit = limits.max_message_chars
            raise ApiError(400, f"messages[{i}] is {len(text)} characters; at most {limit}",
                           f"messages[{i}].content", "message_too_long")  # fmt: skip
        total += len(text)
        if message.role in ("user", "assistant"):
            turns.append(Turn("user" if message.role == "user" else "bot", text))
    if total > limits.max_history_chars:
        raise ApiError(400, f"the messages hold {total} characters; at most {limits.max_history_chars}",
                       "messages", "context_length_exceeded")  # fmt: skip
    if not any(t.role == "user" for t in turns):
        raise ApiError(400, "messages must hold at least one user message", "messages")
    return turns


def sampling(request: ChatRequest, bot: Chatbot, limits: ServeConfig) -> SampleConfig:
    """The request's sampling options over the bot's defaults, range-checked as OpenAI does."""
    if request.n not in (None, 1):
        raise ApiError(400, "n must be 1: this server returns one choice", "n")
    asked = (request.max_completion_tokens, request.max_tokens)  # the newer name wins
    max_tokens = next((n for n in asked if n is not None), limits.default_max_tokens)
    checks: list[tuple[str, Any, bool, str]] = [
        ("max_tokens", max_tokens, 1 <= max_tokens <= limits.max_tokens, f"in [1, {limits.max_tokens}]"),
        ("temperature", request.temperature, request.temperature is None or 0 <= request.temperature <= 2,
         "in [0, 2]"),
        ("top_p", request.top_p, request.top_p is None or 0 < request.top_p <= 1, "in (0, 1]"),
        ("top_k", request.top_k, request.top_k is None or request.top_k >= 0, ">= 0 (0 keeps all)"),
        ("repetition_penalty", request.repetition_penalty,
         request.repetition_penalty is None or 0 < request.repetition_penalty <= 10, "in (0, 10]"),
        ("seed", request.seed, request.seed is None or 0 <= request.seed < 2**63, "in [0, 2**63)"),
    ]  # fmt: skip
    for name, value, ok, allowed in checks:
        if not ok:
            raise ApiError(400, f"{name} must be {allowed}, got {value}", name)
    given = {"temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k,
             "repetition_penalty": request.repetition_penalty, "seed": request.seed}  # fmt: skip
    options = {k: v for k, v in given.items() if v is not None}
    return SampleConfig(**{**vars(bot.sample), **options, "max_new_tokens": max_tokens})


def stop_strings(request: ChatRequest) -> list[str]:
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > 4:
        raise ApiError(400, "stop may hold at most 4 strings", "stop")
    return stops


class Gate:
    """At most ``slots`` answers at once; up to ``queue`` more requests wait, later ones get 429."""

    def __init__(self, slots: int, queue: int) -> None:
        self.slots, self.queue = slots, queue
        self.active = self.waiting = 0
        self._free = anyio.Semaphore(slots)
        self.limiter = anyio.CapacityLimiter(slots)  # worker threads for the model

    async def enter(self) -> Callable[[], None]:
        """Wait for a slot; returns the function that frees it (safe to call more than once)."""
        if self.active >= self.slots and self.waiting >= self.queue:
            raise ApiError(429, f"the server is busy ({self.active} answers running, {self.waiting} "
                           "waiting); try again shortly", code="server_busy")  # fmt: skip
        self.waiting += 1
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        freed = False

        def leave() -> None:
            nonlocal freed
            if not freed:
                freed = True
                self.active -= 1
                self._free.release()

        return leave


async def pieces(answer: Generator[str, None, None], limiter: anyio.CapacityLimiter) -> AsyncIterator[str]:
    """The pieces of ``answer``, each computed in a worker thread. Closing this async generator
    (the client went away) closes ``answer`` at once, so no more tokens are generated."""
    try:
        while True:
            piece = await anyio.to_thread.run_sync(next, answer, None, limiter=limiter)
            if piece is None:
                return
            yield piece
    finally:
        answer.close()


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before it is read whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = ApiError(413, f"the request body is over {self.limit} bytes", code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            await too_big.response()(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # FastAPI passes an HTTPException from here on unchanged
                raise HTTPException(413, too_big.message)
            return message

        await self.app(scope, counted, send)


class SlotResponse(StreamingResponse):
    """A streaming response that frees its generation slot and closes its stream however it ends
    (finished, client gone, server shutting down)."""

    def __init__(self, stream: AsyncIterator[str], leave: Callable[[], None]) -> None:
        super().__init__(stream, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        self._stream, self._leave = stream, leave

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._leave()
            aclose: Callable[[], Awaitable[None]] | None = getattr(self._stream, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def create_app(bot: Chatbot, limits: ServeConfig | None = None) -> FastAPI:
    """The ASGI app serving ``bot``. Run it with uvicorn (``minigpt2 serve`` does)."""
    limits = limits or ServeConfig()
    gate = Gate(limits.max_concurrent, limits.max_queue)
    created = int(time.time())
    app = FastAPI(title="minigpt2", summary="An OpenAI-compatible API for a character-level GPT-2",
                  docs_url="/docs", redoc_url=None)  # fmt: skip
    app.state.gate = gate
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":
            return ApiError(400, "the request body is not valid JSON").response()
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else "the request body is missing"
        return ApiError(400, message, where).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "request_too_large" if err.status_code == 413 else None
        return ApiError(err.status_code, str(err.detail), code=code).response()

    async def authorised(request: Request) -> None:
        if limits.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), limits.api_key):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                           code="invalid_api_key")  # fmt: skip

    # OpenAI's model object, plus what the web page needs to start its controls from: the sampling
    # defaults and the limits this server was started with (clients ignore unknown fields).
    model_card = {
        "id": limits.model_id, "object": "model", "created": created, "owned_by": "minigpt2",
        "defaults": {"temperature": bot.sample.temperature, "top_k": bot.sample.top_k,
                     "top_p": bot.sample.top_p, "max_tokens": limits.default_max_tokens},
        "limits": {name: getattr(limits, name) for name in LIMITS},
    }  # fmt: skip

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("minigpt2").joinpath("static/chat.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": limits.model_id, "active": gate.active, "waiting": gate.waiting}

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(authorised)])
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != limits.model_id:
            raise ApiError(404, f"no model {model_id!r}; this server has {limits.model_id!r}", "model",
                           "model_not_found")  # fmt: skip
        return model_card

    @app.post("/v1/chat/completions", dependencies=[Depends(authorised)], response_model=None)
    async def completions(body: ChatRequest, request: Request) -> JSONResponse | SlotResponse:
        turns = to_turns(body, limits)
        try:
            sample = sampling(body, bot, limits)
        except UserError as err:  # SampleConfig's own checks, e.g. a non-finite number
            raise ApiError(400, str(err)) from None
        info = ReplyInfo()
        answer = bot.answer(turns, sample, generator=make_generator(sample.seed),
                            stop_strings=stop_strings(body), info=info)  # fmt: skip
        leave = await gate.enter()
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": limits.model_id}
        usage: dict[str, int] = {}  # filled in once the answer is complete

        def fill_usage() -> dict[str, int]:
            usage.update(prompt_tokens=info.prompt_tokens, completion_tokens=info.completion_tokens,
                         total_tokens=info.prompt_tokens + info.completion_tokens)  # fmt: skip
            return usage

        if body.stream:
            with_usage = body.stream_options is not None and body.stream_options.include_usage

            async def events() -> AsyncIterator[str]:
                chunk = {**head, "object": "chat.completion.chunk", "system_fingerprint": None}

                def event(delta: dict[str, str], finish: str | None = None) -> str:
                    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                    return sse({**chunk, "choices": [choice]})

                yield event({"role": "assistant", "content": ""})
                async for piece in pieces(answer, gate.limiter):
                    yield event({"content": piece})
                yield event({}, info.finish_reason)
                if with_usage:
                    yield sse({**chunk, "choices": [], "usage": fill_usage()})
                yield sse("[DONE]")

            return SlotResponse(events(), leave)

        text = []
        try:
            async for piece in pieces(answer, gate.limiter):
                text.append(piece)
                if await request.is_disconnected():  # nobody is waiting for the rest
                    break
        finally:
            leave()
        message = {"role": "assistant", "content": "".join(text).strip()}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": info.finish_reason}
        return JSONResponse({**head, "object": "chat.completion", "choices": [choice],
                             "usage": fill_usage(), "system_fingerprint": None})  # fmt: skip

    return app


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening TCP socket; ``port=0`` picks a free port (read it from ``getsockname()``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use; pick another with --port") from None
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror}; check --host") from None
    return sock


def address(sock: socket.socket) -> str:
    """The URL of a bound socket, e.g. ``http://127.0.0.1:8000/``."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if sock.family == socket.AF_INET6 else f"http://{host}:{port}/"


def make_server(app: FastAPI) -> uvicorn.Server:
    """A uvicorn server for ``app``; call ``.run(sockets=[bind(...)])``, set ``.should_exit`` to stop."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))


def run_server(
    app: FastAPI, host: str = "127.0.0.1", port: int = 8000, on_ready: Callable[[str], None] | None = None
) -> None:
    """Serve ``app`` until Ctrl-C; ``on_ready`` receives the address once the socket listens."""
    sock = bind(host, port)
    server = make_server(app)
    if on_ready is not None:
        on_ready(address(sock))
    server.run(sockets=[sock])
