"""Helpers shared by ``test_serve.py`` and ``test_serve_browser.py`` (not a test module).

``tiny_chatbot`` builds an untrained one-layer model with the dialogue template (its answers are
random characters, which is all transport tests need); ``running`` serves an app with real uvicorn
on a free loopback port in a background thread and yields its address.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import torch

from minigpt2 import serve
from minigpt2.core.chat import Chatbot
from minigpt2.core.config import ModelConfig, SampleConfig
from minigpt2.core.model import GPT
from minigpt2.core.tokenizer import CharTokenizer

# Italian letters too, so UTF-8 multi-byte characters cross the wire in every test.
CHARS = sorted(set(" \n!',-.:;?abcdefghijklmnopqrstuvwxyzàèéìòù"))


def tiny_chatbot(seed: int = 0, block_size: int = 32) -> Chatbot:
    torch.manual_seed(seed)
    tok = CharTokenizer(CHARS)
    config = ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16)
    return Chatbot(GPT(config).eval(), tok, sample=SampleConfig(max_new_tokens=40, temperature=1.0))


@contextlib.contextmanager
def running(bot: Chatbot, limits: serve.ServeConfig | None = None) -> Iterator[str]:
    """Serve ``bot`` on 127.0.0.1 (a free port) while the block runs; yields ``http://127.0.0.1:PORT/``."""
    sock = serve.bind("127.0.0.1", 0)
    server = serve.make_server(serve.create_app(bot, limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield serve.address(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
