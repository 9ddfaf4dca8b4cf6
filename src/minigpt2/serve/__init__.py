"""The chatbot over HTTP: an OpenAI-compatible chat-completions API and a one-page web chat.

Only transport lives here. The conversation logic is ``Chatbot``'s (``minigpt2.core.chat``): the
server turns OpenAI ``messages`` into ``Turn``s, builds the prompt with ``Chatbot.prepare``, draws
the answer's ids through the batched engine (``minigpt2.fast.batch_decoder``), where every running answer
advances by one character in the same model step, turns them into text with the textbook's
``ReplyText`` as each id comes (``Chatbot.new_reply_text``: stop strings, trimming, counting, as
``Chatbot.answer`` does), and sends it back whole or as server-sent events. Endpoints:

- ``POST /v1/chat/completions``: ``messages`` in, the reply out; ``"stream": true`` sends
  ``chat.completion.chunk`` events and ends with ``data: [DONE]``, as OpenAI's API does; ``n`` asks
  for several answers (choices) at once.
- ``GET /v1/models``, ``GET /v1/models/{id}``: the one model this server holds.
- ``GET /health``: liveness and load (requests being answered and waiting, rows of the batch).
- ``GET /``: the web chat page (``static/chat.html``: no build step, no external assets).

What keeps it standing: request bodies, messages, histories and ``max_tokens`` are bounded and
sampling options range-checked (400/413 with an OpenAI-style JSON error); at most ``max_concurrent``
answers (the rows of the batch) are generated at once, up to ``max_queue`` more requests wait, and
the rest get 429; a client that disconnects stops its generation, its row free before the next
step; an optional API key (Bearer, printable ASCII) guards ``/v1``. The model runs in one decoding
thread and everything else on the event loop, each answer's text in a coroutine of its own that the
decoding thread wakes (at its first id, when its next chunk is due, at its end), so the model's
steps never hold up the requests.
Connections are bounded too: a deadline for each request's headers, a stall timeout for its body,
and at most ``max_connections`` open (below the file descriptor limit). On a loopback address only
loopback ``Host`` names are answered (DNS rebinding).

The files, in the order a request meets them:

- ``server.py``: the listening socket, its addresses and uvicorn (``bind``, ``address``,
  ``addresses``, ``make_server``, ``run_server``).
- ``descriptors.py``: the connection cap below ``RLIMIT_NOFILE`` (``connection_cap``), and running
  out of descriptors reported as one rate-limited line.
- ``connections.py``: uvicorn's h11 protocol with the header deadline, the body stall timeout and
  the cap (imported with uvicorn, by ``make_server`` only).
- ``hosts.py``: ``HostCheck``, the ``Host`` header check (every loopback spelling alike).
- ``admission.py``: what the server takes on: ``BodyLimit`` (413), ``Gate`` (slots, queue, 429)
  and ``SlotResponse`` (a stream that frees its slots).
- ``config.py``: ``ServeConfig``, every limit and default of ``minigpt2 serve`` (the command-line
  parser takes its defaults from it), ``LIMITS`` and the API key rules.
- ``schema.py``: the OpenAI request models, ``ApiError``, and the checks that turn a request into
  turns and sampling options.
- ``engine.py``: ``Engine``, the decoding thread that owns the ``BatchDecoder``: rows join, step
  together and leave; ``Job``, one row's generation.
- ``feed.py``: ``Feed``, the hand-off of one row's ids from the decoding thread to the event loop.
- ``replies.py``: ``Reply``, one request's choices: their rows, and their text in chunks.
- ``app.py``: ``create_app``: the endpoints, the error handlers, the shape of the answers, and the
  lifespan that starts and stops the decoding thread.
- ``static/chat.html``: the web chat page; its screen (conversation, composer, controls) is
  ``minigpt2/exports/web/chat_ui.js``, shared with the exported page, and put in by ``app.chat_page``.

Tests: ``pytest tests/serve/test_serve.py`` (the official ``openai`` client, bad requests),
``tests/serve/test_serve_queue.py`` (the queue, 429, disconnects, a load test),
``tests/serve/test_serve_cli.py``
(the command),
``tests/serve/test_serve_replies.py`` (chunks, the hand-off, the text of an answer),
``tests/serve/test_serve_batch.py`` (an answer alone and among others, rows that leave at once, ``n``),
``tests/serve/test_serve_connections.py`` (idle, slow and too many connections),
``tests/serve/test_serve_http.py`` (Host names, methods, API key rules, addresses) and
``tests/serve/test_serve_browser.py`` (headless Chromium, driven by Playwright).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from minigpt2.serve.admission import BodyLimit, ClientGoneError, Gate, SlotResponse
    from minigpt2.serve.app import create_app
    from minigpt2.serve.config import CONNECTION_LIMITS, LIMITS, ServeConfig, check_api_key
    from minigpt2.serve.descriptors import connection_cap
    from minigpt2.serve.hosts import LOOPBACK, HostCheck, is_loopback
    from minigpt2.serve.schema import MAX_STOP_CHARS, ApiError, ChatMessage, ChatRequest
    from minigpt2.serve.server import address, addresses, bind, make_server, run_server

# Where each name of the package lives. They are imported on first use, not with the package, so
# that ``minigpt2.serve.config`` (which the command-line parser reads) comes without the web
# framework and torch, and ``minigpt2 --help`` stays fast.
_HOMES = {
    "admission": ("BodyLimit", "ClientGoneError", "Gate", "SlotResponse"),
    "app": ("create_app",),
    "config": ("CONNECTION_LIMITS", "LIMITS", "ServeConfig", "check_api_key"),
    "descriptors": ("connection_cap",),
    "hosts": ("LOOPBACK", "HostCheck", "is_loopback"),
    "schema": ("MAX_STOP_CHARS", "ApiError", "ChatMessage", "ChatRequest"),
    "server": ("address", "addresses", "bind", "make_server", "run_server"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # found directly from now on
    return value


__all__ = [
    "CONNECTION_LIMITS",
    "LIMITS",
    "LOOPBACK",
    "MAX_STOP_CHARS",
    "ApiError",
    "BodyLimit",
    "ChatMessage",
    "ChatRequest",
    "ClientGoneError",
    "Gate",
    "HostCheck",
    "ServeConfig",
    "SlotResponse",
    "address",
    "addresses",
    "bind",
    "check_api_key",
    "connection_cap",
    "create_app",
    "is_loopback",
    "make_server",
    "run_server",
]
