"""The chatbot over HTTP: an OpenAI-compatible chat-completions API and a one-page web chat.

Only transport lives here. The conversation logic is ``Chatbot.answer`` (``minigpt2.core.chat``): the
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

import contextlib
import errno
import json
import logging
import secrets
import socket
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from minigpt2.core.chat import Chatbot, ReplyInfo, Turn
from minigpt2.core.config import SampleConfig
from minigpt2.core.generate import make_generator
from minigpt2.errors import ConfigError, UserError

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
    # Host headers accepted ("*" or empty: any). `minigpt2 serve` on loopback accepts only loopback
    # names, so a web page on another site cannot reach the server through DNS rebinding.
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in (*LIMITS, "default_max_tokens"):
            if name != "max_queue" and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ConfigError(f"max_queue must be >= 0, got {self.max_queue}")
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens)
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key is empty; give a key or leave it out")


log = logging.getLogger(__name__)
# The ServeConfig fields that are plain integer limits (command-line options of the same name).
LIMITS = ("max_message_chars", "max_history_chars", "max_messages", "max_tokens", "max_concurrent",
          "max_queue", "max_body_bytes")  # fmt: skip


MAX_STOP_CHARS = 64  # per stop string; each generated character is checked against every one


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
    seed: int | None = None  # a negative seed (some clients send -1) means none: a fresh draw
    stop: str | list[str] | None = None
    n: int | None = None
    # Not supported: accepted only when they ask for nothing (a 400 otherwise, not a silent "no").
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


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
    plain_text = (request.response_format or {}).get("type", "text") == "text"
    unsupported = [("logprobs", bool(request.logprobs)), ("tools", bool(request.tools)),
                   ("response_format", not plain_text)]  # fmt: skip
    for name, wanted in unsupported:
        if wanted:
            raise ApiError(400, f"{name} is not supported by this server", name)
    # The newer name wins; errors name the field the request used.
    length_field = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(request, length_field)
    max_tokens = limits.default_max_tokens if max_tokens is None else max_tokens
    checks: list[tuple[str, Any, bool, str]] = [
        (length_field, max_tokens, 1 <= max_tokens <= limits.max_tokens, f"in [1, {limits.max_tokens}]"),
        ("temperature", request.temperature, request.temperature is None or 0 <= request.temperature <= 2,
         "in [0, 2]"),
        ("top_p", request.top_p, request.top_p is None or 0 <= request.top_p <= 1, "in [0, 1]"),
        ("top_k", request.top_k, request.top_k is None or request.top_k >= 0, ">= 0 (0 keeps all)"),
        ("repetition_penalty", request.repetition_penalty,
         request.repetition_penalty is None or 0 < request.repetition_penalty <= 10, "in (0, 10]"),
        ("seed", request.seed, request.seed is None or request.seed < 2**63, "below 2**63"),
    ]  # fmt: skip
    for name, value, ok, allowed in checks:
        if not ok:
            raise ApiError(400, f"{name} must be {allowed}, got {value}", name)
    given = {"temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k,
             "repetition_penalty": request.repetition_penalty, "seed": request.seed}  # fmt: skip
    options: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if request.top_p == 0:  # OpenAI allows 0: only the likeliest character, i.e. greedy
        options.update(top_p=1.0, temperature=0.0)
    if request.seed is not None and request.seed < 0:
        options["seed"] = None
    return SampleConfig(**{**vars(bot.sample), **options, "max_new_tokens": max_tokens})


def stop_strings(request: ChatRequest) -> list[str]:
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > 4 or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop may hold at most 4 strings of at most {MAX_STOP_CHARS} characters", "stop")
    return stops


class ClientGoneError(Exception):
    """The client disconnected while its request waited for a slot."""


class Gate:
    """At most ``slots`` answers at once; up to ``queue`` more requests wait, later ones get 429."""

    def __init__(self, slots: int, queue: int) -> None:
        self.slots, self.queue = slots, queue
        # Requests let in (running or waiting). Counted before any await, so a burst of requests
        # arriving together cannot slip past the limit while the semaphore hands slots over.
        self.admitted = self.active = 0
        self._free = anyio.Semaphore(slots)
        self.limiter = anyio.CapacityLimiter(slots)  # worker threads for the model

    @property
    def waiting(self) -> int:
        return self.admitted - self.active

    async def enter(self, gone: Callable[[], Awaitable[bool]] | None = None) -> Callable[[], None]:
        """Wait for a slot; returns the function that frees it (safe to call more than once).
        ``gone`` is polled while waiting: a client that has left gives up its place in the queue."""
        if self.admitted >= self.slots + self.queue:
            raise ApiError(429, f"the server is busy ({self.active} answers running, {self.waiting} "
                           "waiting); try again shortly", code="server_busy")  # fmt: skip
        self.admitted += 1
        try:
            await self._acquire(gone)
        except BaseException:
            self.admitted -= 1
            raise
        self.active += 1
        freed = False

        def leave() -> None:
            nonlocal freed
            if not freed:
                freed = True
                self.active -= 1
                self.admitted -= 1
                self._free.release()

        return leave

    async def _acquire(self, gone: Callable[[], Awaitable[bool]] | None) -> None:
        if gone is None:
            await self._free.acquire()
            return
        got = False
        async with anyio.create_task_group() as group:

            async def take() -> None:
                nonlocal got
                await self._free.acquire()
                got = True
                group.cancel_scope.cancel()

            async def watch() -> None:
                while not await gone():
                    await anyio.sleep(0.2)
                group.cancel_scope.cancel()

            group.start_soon(take)
            group.start_soon(watch)
        if not got:
            raise ClientGoneError


async def pieces(
    answer: Generator[str, None, None], limiter: anyio.CapacityLimiter
) -> AsyncGenerator[str, None]:
    """The pieces of ``answer``, each computed in a worker thread. Closing this async generator
    (``contextlib.aclosing``: the client went away) closes ``answer``: no more tokens are made."""
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
    if limits.allowed_hosts:  # a web page elsewhere cannot reach a loopback server by renaming it
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(limits.allowed_hosts))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":
            return ApiError(400, "the request body is not valid JSON").response()
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        if where is None:  # the body as a whole: missing, not an object, or not sent as JSON
            return ApiError(400, "send a JSON object with Content-Type: application/json").response()
        return ApiError(400, f"{where}: {first.get('msg', 'invalid value')}", where).response()

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse({"error": {"message": f"internal error: {err}", "type": "server_error",
                                       "param": None, "code": None}}, status_code=500)  # fmt: skip

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "request_too_large" if err.status_code == 413 else None
        return ApiError(err.status_code, str(err.detail), code=code).response()

    async def authorised(request: Request) -> None:
        if limits.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given, wanted = token.strip().encode(), limits.api_key.encode()  # bytes: any characters
        if scheme.lower() != "bearer" or not secrets.compare_digest(given, wanted):
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
        try:
            leave = await gate.enter(request.is_disconnected)
        except ClientGoneError:  # nobody will read this; the slot it waited for goes to the next request
            return JSONResponse({"error": {"message": "the client went away", "type": "client_gone"}}, 408)
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
                try:
                    async with contextlib.aclosing(pieces(answer, gate.limiter)) as stream:
                        async for piece in stream:
                            yield event({"content": piece})
                except Exception as err:  # the headers are sent: report it in the stream, then end
                    log.exception("generation failed")
                    yield sse({"error": {"message": f"internal error: {err}", "type": "server_error"}})
                    return
                yield event({}, info.finish_reason)
                if with_usage:
                    yield sse({**chunk, "choices": [], "usage": fill_usage()})
                yield sse("[DONE]")

            return SlotResponse(events(), leave)

        text = []
        try:
            async with contextlib.aclosing(pieces(answer, gate.limiter)) as stream:
                async for piece in stream:
                    text.append(piece)
                    if await request.is_disconnected():  # nobody is waiting for the rest
                        break
        finally:
            leave()
        message = {"role": "assistant", "content": "".join(text)}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": info.finish_reason}
        return JSONResponse({**head, "object": "chat.completion", "choices": [choice],
                             "usage": fill_usage(), "system_fingerprint": None})  # fmt: skip

    return app


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening TCP socket; ``port=0`` picks a free port (read it from ``getsockname()``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if not 0 <= port <= 65535:
        sock.close()
        raise UserError(f"port must be in [0, 65535] (0 picks a free one), got {port}")
    try:
        sock.bind((host, port))
        sock.listen(2048)  # now, so the address given to on_ready already accepts connections
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
