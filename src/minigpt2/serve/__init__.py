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

The files, in the order a request meets them:

- ``server.py``: the listening socket and uvicorn (``bind``, ``address``, ``make_server``, ``run_server``).
- ``admission.py``: what the server takes on: ``BodyLimit`` (413), ``Gate`` (slots, queue, 429),
  answers computed in worker threads, and ``SlotResponse`` (a stream that frees its slot).
- ``schema.py``: ``ServeConfig`` and ``LIMITS``, the OpenAI request models, ``ApiError``, and the checks
  that turn a request into turns and sampling options.
- ``app.py``: ``create_app``: the endpoints, the error handlers, the shape of the answers.
- ``static/chat.html``: the web chat page.

Tests: ``pytest tests/test_serve.py`` (the official ``openai`` client, a load test, bad requests)
and ``tests/test_serve_browser.py`` (headless Chromium, driven by Playwright).
"""

from minigpt2.serve.admission import BodyLimit, ClientGoneError, Gate, SlotResponse
from minigpt2.serve.app import create_app
from minigpt2.serve.schema import LIMITS, MAX_STOP_CHARS, ApiError, ChatMessage, ChatRequest, ServeConfig
from minigpt2.serve.server import address, bind, make_server, run_server

__all__ = [
    "LIMITS",
    "MAX_STOP_CHARS",
    "ApiError",
    "BodyLimit",
    "ChatMessage",
    "ChatRequest",
    "ClientGoneError",
    "Gate",
    "ServeConfig",
    "SlotResponse",
    "address",
    "bind",
    "create_app",
    "make_server",
    "run_server",
]
