"""The ``minigpt2 serve`` command as a real process: it serves a run, stops on Ctrl+C, refuses bad
options in one line, and serves the default chatbot when no run is named.
Run with ``pytest tests/serve/test_serve_cli.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers_serve import client, tiny_chatbot
from minigpt2.storage import checkpoint

SRC = Path(__file__).resolve().parents[2] / "src"


def serve_cli(*args: object, cwd: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-m", "minigpt2", "serve", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_serve_command_runs_and_stops_on_ctrl_c(tmp_path: Path, one_line_error: Any) -> None:
    bot = tiny_chatbot()
    checkpoint.save(tmp_path / "mybot" / "best", bot.model, bot.tokenizer, {"chat_template": "dialogue"})
    proc = serve_cli(
        "mybot", "--port", "0", "--max-concurrent", "1", "--max-new-tokens", "5000", cwd=tmp_path
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "serving mybot as 'mybot'" in line, line + (proc.stderr.read() if proc.poll() else "")
        base = line.split("web chat at ")[1].split(",")[0]
        reply = client(base).chat.completions.create(
            model="mybot", messages=[{"role": "user", "content": "ciao"}], max_tokens=5
        )
        assert reply.model == "mybot" and reply.choices[0].message.content
        port = base.rsplit(":", 1)[1].rstrip("/")
        clash = subprocess.run([sys.executable, "-m", "minigpt2", "serve", "mybot", "--port", port],
                               cwd=tmp_path, capture_output=True, text=True, timeout=60,
                               env=dict(os.environ, PYTHONPATH=str(SRC)))  # fmt: skip
        assert "already in use" in one_line_error(clash)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    errors = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 0, errors
    # A default above the limit is capped, and said.
    assert "--max-new-tokens 5000 is above --max-tokens 1000" in errors and "default to 1000\n" in errors


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["mybot", "--max-concurrent", "0"], "max_concurrent must be >= 1"),
        (["mybot", "--max-queue", "-1"], "max_queue must be >= 0"),
        (["missing-run"], "missing-run"),
        (["mybot", "--host", "no-such-host.invalid"], "cannot listen on"),
        (["mybot", "--port", "70000"], "port must be in [0, 65535]"),
        (["mybot", "--api-key", ""], "--api-key is empty"),
        (["mybot", "--api-key", "clé-秘密"], "only printable ASCII"),
        (["mybot", "--api-key", " sekret"], "whitespace"),
        (["mybot", "--max-connections", "0"], "max_connections must be >= 1"),
        (["mybot", "--max-connections", "1000000000"], "file descriptors"),
        (["mybot", "--header-timeout", "0"], "header_timeout must be"),
        (["mybot", "--body-timeout", "nan"], "body_timeout must be"),
        (["mybot", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["--max-concurrent", "0"], "max_concurrent must be >= 1"),  # before training a default bot
    ],
)
def test_serve_command_bad_options_are_one_line_errors(
    tmp_path: Path, cli: Any, one_line_error: Any, args: list[str], expected: str
) -> None:
    bot = tiny_chatbot()
    checkpoint.save(tmp_path / "mybot" / "best", bot.model, bot.tokenizer, {"chat_template": "dialogue"})
    port = [] if "--port" in args else ["--port", "0"]
    assert expected in one_line_error(cli("serve", *args, *port, timeout=60))


def test_serve_and_quickstart_without_a_run_use_the_default_chatbot(tmp_path: Path, cli: Any) -> None:
    """`make serve` / `make chat` on a machine that already trained the default chatbot: no
    training, the run under runs/ is served (and chatted with) at once."""
    bot = tiny_chatbot()
    run = tmp_path / "runs" / "chat-chatterbot-english"
    checkpoint.save(run / "best", bot.model, bot.tokenizer, {"chat_template": "dialogue"})
    (run / "summary.json").write_text("{}", encoding="utf-8")  # training had finished
    chat = cli("quickstart", "--prompt", "ciao", "--max-new-tokens", "5", timeout=60)
    assert chat.returncode == 0 and "training" not in chat.stdout, chat.stdout + chat.stderr
    proc = serve_cli("--port", "0", cwd=tmp_path)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "as 'chat-chatterbot-english'" in line and "training" not in line, line
        base = line.split("web chat at ")[1].split(",")[0]
        assert httpx.get(base + "health").json()["model"] == "chat-chatterbot-english"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
