"""``minigpt2 serve`` at the HTTP level: which Host names it answers, methods, docs, keys, addresses.

A real uvicorn server (``helpers_serve.running``) gets requests with every spelling of a loopback
``Host`` (IPv4 and IPv6, with and without a port) and foreign ones; ``HEAD`` and ``OPTIONS``; API keys
a client cannot send. ``minigpt2 serve`` runs as a real process on ``::1`` (a foreign Host is refused
there too) and on 0.0.0.0 (it prints addresses a browser can open); a bad key in ``--api-key`` or
``MINIGPT2_API_KEY`` is one line and exit status 2.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from helpers_serve import running, tiny_chatbot
from minigpt2 import serve
from minigpt2.errors import ConfigError
from minigpt2.serve.hosts import host_name
from minigpt2.storage import checkpoint

SRC = Path(__file__).resolve().parents[2] / "src"
LOOPBACK_ONLY = serve.ServeConfig(allowed_hosts=(serve.LOOPBACK,))


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")

GOOD_HOSTS = ["127.0.0.1", "127.0.0.1:{port}", "localhost", "localhost:{port}", "LocalHost.:{port}",
              "127.4.5.6:80", "[::1]", "[::1]:{port}", "[::ffff:127.0.0.1]:{port}"]  # fmt: skip
BAD_HOSTS = ["attacker.example", "attacker.example:{port}", "127.0.0.1.attacker.example", "localhost.example",
             "[::1]x", "[::1", "localhost:abc", "0.0.0.0:{port}", "[::2]:{port}", "10.0.0.1", ""]  # fmt: skip


def refused(response: httpx.Response) -> bool:
    error = response.json().get("error", {}) if response.status_code == 400 else {}
    return error.get("code") == "invalid_host" and error.get("type") == "invalid_request_error"


@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=needs_ipv6)])
def test_every_loopback_spelling_is_answered_and_no_other(host: str) -> None:
    """DNS rebinding: a page on another site that points its name at the loopback still sends its
    own name as Host. Every loopback spelling is alike, whichever loopback address the server has."""
    with running(tiny_chatbot(), LOOPBACK_ONLY, host=host) as base:
        port = base.rsplit(":", 1)[1].rstrip("/")
        for name in GOOD_HOSTS:
            response = httpx.get(base + "health", headers={"Host": name.format(port=port)})
            assert response.status_code == 200, (name, response.text)
        for name in BAD_HOSTS:
            for path in ("health", "v1/models", ""):
                response = httpx.get(base + path, headers={"Host": name.format(port=port)})
                assert refused(response), (name, path, response.status_code, response.text)


def test_host_names_are_read_as_browsers_write_them() -> None:
    assert [host_name(h) for h in ("[::1]:8000", "[::1]", "::1", "LOCALHOST.:80", "a.b:1")] == [
        "::1", "::1", "::1", "localhost", "a.b"
    ]  # fmt: skip
    assert [host_name(h) for h in ("[::1]:x", "[::1", "a:b", "", ":80")] == [None] * 5
    assert all(serve.is_loopback(h) for h in ("127.255.0.1", "::1", "[::1]", "localhost", "::ffff:127.0.0.1"))
    assert not any(serve.is_loopback(h) for h in ("0.0.0.0", "::", "128.0.0.1", "localhost.example", "::2"))


def test_head_and_unsupported_methods_name_what_is_allowed() -> None:
    with running(tiny_chatbot()) as base:
        head = httpx.head(base)
        assert head.status_code == 200 and head.text == "" and "text/html" in head.headers["content-type"]
        assert httpx.head(base + "health").status_code == 200
        for method, path, allowed in [("OPTIONS", "", {"GET", "HEAD"}), ("POST", "health", {"GET", "HEAD"}),
                                      ("DELETE", "v1/chat/completions", {"POST"})]:  # fmt: skip
            response = httpx.request(method, base + path)
            assert response.status_code == 405, (method, path)
            assert set(response.headers["allow"].replace(" ", "").split(",")) == allowed
            assert response.json()["error"]["message"] == "Method Not Allowed"


def test_no_interactive_docs_that_need_the_internet() -> None:
    with running(tiny_chatbot()) as base:
        assert httpx.get(base + "docs").status_code == 404  # its scripts come from a CDN
        assert "/v1/chat/completions" in httpx.get(base + "openapi.json").json()["paths"]


@pytest.mark.parametrize(
    ("key", "expected"),
    [("", "is empty"), ("   ", "is empty"), (" sekret", "whitespace"), ("sekret\n", "whitespace"),
     ("clé-秘密", "'é' (character 3)"), ("tab\tkey", "'\\t'"), ("ключ", "printable ASCII")],
)  # fmt: skip
def test_an_api_key_no_client_can_send_is_refused(key: str, expected: str) -> None:
    with pytest.raises(ConfigError, match="api_key") as refusal:
        serve.ServeConfig(api_key=key)
    assert expected in str(refusal.value)


def test_a_key_of_printable_ascii_works_from_every_client() -> None:
    key = "sk-Pass phrase_with.punctuation~!"
    with running(tiny_chatbot(), serve.ServeConfig(api_key=key)) as base:
        models = openai.OpenAI(base_url=base + "v1", api_key=key, max_retries=0, timeout=30).models.list()
        assert models.data[0].id == "minigpt2"
        spaced = httpx.get(base + "v1/models", headers={"Authorization": f"Bearer   {key}"})
        assert spaced.status_code == 200  # the spaces around the key are not part of it
        assert httpx.get(base + "v1/models", headers={"Authorization": f"Bearer {key}x"}).status_code == 401


@contextlib.contextmanager
def serving(tmp_path: Path, *args: str) -> Iterator[dict[str, Any]]:
    """``minigpt2 serve`` on a tiny model in its own process while the block runs. Yields a dict:
    ``line``, what it printed first; once the block is over, ``rest`` (stdout) and ``stderr``."""
    bot = tiny_chatbot()
    checkpoint.save(tmp_path / "mybot" / "best", bot.model, bot.tokenizer, {"chat_template": "dialogue"})
    env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-m", "minigpt2", "serve", "mybot", "--port", "0", *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    run: dict[str, Any] = {}
    try:
        assert proc.stdout is not None
        run["line"] = proc.stdout.readline()
        yield run
    finally:
        proc.send_signal(signal.SIGINT)
        run["rest"], run["stderr"] = proc.communicate(timeout=60)


def web_chat(line: str) -> str:
    assert "web chat at " in line, line
    return line.split("web chat at ")[1].split(",")[0]


@needs_ipv6
def test_serve_on_ipv6_loopback_refuses_a_foreign_host(tmp_path: Path) -> None:
    with serving(tmp_path, "--host", "::1") as run:
        base = web_chat(run["line"])
        assert base.startswith("http://[::1]:")
        assert httpx.get(base + "health").status_code == 200
        assert refused(httpx.get(base + "v1/models", headers={"Host": "attacker.example"}))


def test_serve_on_every_interface_prints_addresses_a_browser_can_open(tmp_path: Path) -> None:
    with serving(tmp_path, "--host", "0.0.0.0", "--api-key", "sekret") as run:
        base = web_chat(run["line"])
        assert base.startswith("http://127.0.0.1:") and "0.0.0.0" not in run["line"]
        assert httpx.get(base + "health").status_code == 200
    assert "0.0.0.0" not in run["rest"], run["rest"]  # the line of this machine's other addresses, if any
    port = int(base.rsplit(":", 1)[1].rstrip("/"))
    urls = serve.addresses("0.0.0.0", port)
    assert urls[0] == base and not any("0.0.0.0" in u for u in urls)
    assert serve.addresses("::", 80)[0] == "http://[::1]:80/"
    assert serve.addresses("::1", 80) == ["http://[::1]:80/"]
    assert serve.addresses("192.0.2.7", 80) == ["http://192.0.2.7:80/"]


@pytest.mark.parametrize("where", ["option", "environment"])
def test_serve_refuses_a_key_no_client_can_send(
    tmp_path: Path, cli: Any, one_line_error: Any, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    bot = tiny_chatbot()
    checkpoint.save(tmp_path / "mybot" / "best", bot.model, bot.tokenizer, {"chat_template": "dialogue"})
    if where == "option":
        line = one_line_error(cli("serve", "mybot", "--port", "0", "--api-key", "clé-秘密", timeout=60))
        assert "--api-key holds 'é'" in line
    else:
        monkeypatch.setenv("MINIGPT2_API_KEY", "sekret \n")
        line = one_line_error(cli("serve", "mybot", "--port", "0", timeout=60))
        assert "MINIGPT2_API_KEY starts or ends with whitespace" in line
