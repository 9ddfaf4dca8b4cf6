"""What a request may say: OpenAI's chat-completions request, and its checks against the limits.

Owns ``ApiError`` (an error sent as OpenAI's ``{"error": {...}}`` JSON), the pydantic models of the
request, and the functions that turn a request into what an answer takes: ``to_turns`` (messages to
turns, bounded), ``sampling`` (options over the bot's defaults, range-checked), ``choices`` (``n``)
and ``stop_strings``. The limits themselves are ``ServeConfig``'s (``config``).
Nothing here touches the network or the model, so every check answers before a slot is taken.

Tests: ``pytest tests/serve/test_serve.py`` (the bad-request cases send each of these through the server).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from minigpt2.core.chat import Chatbot, Turn
from minigpt2.core.config import SampleConfig
from minigpt2.errors import ConfigError
from minigpt2.serve.config import ServeConfig

MAX_STOP_CHARS = 64  # per stop string; each generated character is checked against every one
MAX_CHOICES = 8  # OpenAI's n: answers to one request (each takes a row of the batch)


class ApiError(Exception):
    """An error the client caused (or a full server): sent as OpenAI's ``{"error": {...}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
                503: "server_error"}  # fmt: skip
        body = {"message": self.message, "type": kind.get(self.status, "invalid_request_error"),
                "param": self.param, "code": self.code}  # fmt: skip
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
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
    """The request's sampling options over the bot's defaults. Their ranges are ``SampleConfig``'s
    (one rule for every front end; OpenAI's where it has one); the answer's length is this server's."""
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
    if not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(400, f"{length_field} must be in [1, {limits.max_tokens}], got {max_tokens}",
                       length_field)  # fmt: skip
    given = {"temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k,
             "repetition_penalty": request.repetition_penalty, "seed": request.seed}  # fmt: skip
    options: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if request.seed is not None and request.seed < 0:  # some clients send -1 for "none"
        options["seed"] = None
    try:
        return SampleConfig(**{**vars(bot.sample), **options, "max_new_tokens": max_tokens})
    except ConfigError as err:
        raise ApiError(400, str(err), err.setting) from None


def choices(request: ChatRequest, limits: ServeConfig) -> int:
    """The request's ``n``: answers to generate, each a row of the batch, so at most the rows there are."""
    most = min(MAX_CHOICES, limits.max_concurrent)
    n = 1 if request.n is None else request.n
    if not 1 <= n <= most:
        raise ApiError(400, f"n must be in [1, {most}], got {n}", "n")
    return n


def stop_strings(request: ChatRequest) -> list[str]:
    """The request's ``stop`` as a list, bounded in number and length."""
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > 4 or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop may hold at most 4 strings of at most {MAX_STOP_CHARS} characters", "stop")
    return stops
