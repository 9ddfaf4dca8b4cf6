"""The terminal chat loop (``cli/repl.py``) at a real terminal and through a pipe.

``Terminal`` runs ``python -m minigpt2 chat RUN`` on a pseudo-terminal, as a person's shell would,
and waits (with generous deadlines, never a fixed sleep) for what it shows: with ``readline`` the
arrow keys edit the line, Up recalls the previous one, Ctrl-L clears the screen and a 9,003-character
paste arrives whole; without it (Python built without readline) a line the terminal cut at its
4,095-byte limit gets a note, and control characters and escape sequences are taken out. What the
model was sent is read back from a ``/save``d conversation. The /command errors run in process,
except those about ``/dev/zero`` and FIFOs: a child process with a memory cap and a deadline reads
those, so that a read without bound fails the test instead of exhausting the machine.
POSIX only (pseudo-terminals). Run: ``pytest tests/cli/test_repl.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from helpers_train import subprocess_env
from minigpt2.cli import repl
from minigpt2.core.config import ModelConfig, SampleConfig
from minigpt2.core.model import GPT
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.inference.chatbot import Chatbot
from minigpt2.storage import checkpoint

TOK = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz .,?!")))
DEADLINE = 120.0  # seconds: each process imports torch on a possibly busy machine
# `minigpt2 chat` in a Python that has no readline module (as some builds have not).
NO_READLINE = "import sys; sys.modules['readline'] = None; from minigpt2.cli import main; sys.exit(main())"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")


class Terminal:
    """A process whose stdin, stdout and stderr are one pseudo-terminal (80 x 24). A thread keeps
    reading what it shows, so that its echo never blocks it; ``expect`` waits for text to appear."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        import fcntl
        import struct
        import termios

        (cwd / "inputrc").write_text("")  # the user's own ~/.inputrc must not change the keys
        env = dict(subprocess_env(), TERM="xterm", INPUTRC=str(cwd / "inputrc"), OMP_NUM_THREADS="1")
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                                     start_new_session=True)  # fmt: skip
        os.close(slave)
        self.shown, self.closed = bytearray(), False
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: every process has closed the terminal
                chunk = b""
            with self.changed:
                self.shown += chunk
                self.closed = not chunk
                self.changed.notify_all()
            if not chunk:
                return

    def text(self, start: int = 0) -> str:
        with self.changed:
            return self.shown[start:].decode("utf-8", "replace")

    def expect(self, text: str, start: int) -> int:
        """Wait until ``text`` is shown after offset ``start``; the offset just past it."""
        needle, deadline = text.encode(), time.monotonic() + DEADLINE
        with self.changed:
            while (at := self.shown.find(needle, start)) < 0:
                left = deadline - time.monotonic()
                assert left > 0 and not self.closed, (
                    f"{text!r} never came; shown: {self.text(start)[-3000:]!r}"
                )
                self.changed.wait(left)
            return at + len(needle)

    def send(self, keys: str) -> None:
        data = keys.encode()
        while data:
            data = data[os.write(self.master, data) :]

    def say(self, keys: str, start: int) -> int:
        """Type ``keys`` and Enter at the prompt, then wait for the answer and the next prompt."""
        self.send(keys + "\r")
        return self.expect("you> ", self.expect("bot> ", start))

    def close(self, timeout: float = DEADLINE) -> int:
        """The exit status, once the process ends (it is killed if it has not within ``timeout``)."""
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self.master >= 0:
                os.close(self.master)
                self.master = -1


@pytest.fixture()
def terminal(tmp_path: Path) -> Iterator[Callable[[list[str]], Terminal]]:
    """Starts ``Terminal``s; any still running when the test ends (it failed) is killed."""
    started: list[Terminal] = []

    def start(argv: list[str]) -> Terminal:
        started.append(Terminal(argv, tmp_path))
        return started[-1]

    yield start
    for each in started:
        with contextlib.suppress(subprocess.TimeoutExpired):
            each.close(timeout=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run holding a tiny untrained model whose vocabulary has every character typed below."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=TOK.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    run = tmp_path_factory.mktemp("repl") / "run"
    checkpoint.save(run / "best", model.eval(), TOK, {"step": 0, "chat_template": "dialogue"})
    return run


def chat_argv(run: Path, *python: str) -> list[str]:
    flags = ["--seed", "1", "--max-new-tokens", "5", "--device", "cpu", "--dtype", "fp32"]
    return [sys.executable, *(python or ("-m", "minigpt2")), "chat", str(run), *flags]


def sent(terminal: Terminal, start: int, tmp_path: Path) -> list[str]:
    """The user's messages as the model got them, from a /save; the terminal is closed after."""
    terminal.send(f"/save {tmp_path / 'c.json'}\r")
    terminal.expect("you> ", terminal.expect("(conversation saved to", start))
    terminal.send("/quit\r")
    assert terminal.close() == 0, terminal.text()[-3000:]
    history = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))["history"]
    return [turn["text"] for turn in history if turn["role"] == "user"]


def test_arrow_keys_history_ctrl_l_and_a_long_paste_at_a_terminal(
    run: Path, tmp_path: Path, terminal: Callable[[list[str]], Terminal]
) -> None:
    pytest.importorskip("readline")
    term = terminal(chat_argv(run))
    at = term.expect("you> ", 0)
    at = term.say("helo\x1b[Dl\x1b[C!", at)  # Left, "l", Right: the "l" goes in the middle
    at = term.say("\x1b[A", at)  # Up: the previous line again
    at = term.say("\x0cabc", at)  # Ctrl-L clears the screen; it is no part of the message
    at = term.say("x" * 9003, at)  # twice what a terminal line holds without line editing
    assert sent(term, at, tmp_path) == ["hello!", "hello!", "abc", "x" * 9003]
    assert "may have cut" not in term.text()


def test_without_readline_a_cut_line_is_noted_and_control_characters_go(
    run: Path, tmp_path: Path, terminal: Callable[[list[str]], Terminal]
) -> None:
    term = terminal(chat_argv(run, "-c", NO_READLINE))
    at = term.expect("you> ", 0)
    term.send("x" * 9003 + "\r")  # the terminal keeps the first 4,095 bytes of the line
    at = term.expect("you> ", term.expect("bot> ", term.expect("the terminal may have cut it", at)))
    at = term.say("he\x1b[Dllo\x0c there\x07", at)  # what arrow keys and Ctrl-L type without readline
    assert sent(term, at, tmp_path) == ["x" * 4095, "hello there"]


def test_clean_takes_out_control_characters_and_escape_sequences() -> None:
    assert repl.clean("a\x0cb\x1b[1;5Dc\x1bOAd\x00e\x7f\x9bf\tg\x1b") == "abcdef\tg"
    assert repl.clean("caf\udcc3") == "caf\ufffd"  # a byte that was not UTF-8 (cut mid-character)
    assert repl.cut_note("é" * 2047 + "x") and not repl.cut_note("x" * 4094)


@pytest.fixture()
def bot() -> Chatbot:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=TOK.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    return Chatbot(model.eval(), TOK, sample=SampleConfig(max_new_tokens=5, seed=1))


def piped(bot: Chatbot, lines: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
          ) -> list[str]:  # fmt: skip
    """``converse`` reading ``lines`` from a pipe: the lines it printed."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    assert repl.converse(bot, "run") == 0
    return capsys.readouterr().out.splitlines()


def test_commands_say_what_is_missing_or_wrong(
    bot: Chatbot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    null_text = tmp_path / "null.json"
    null_text.write_text('{"history": [{"role": "user", "text": null}]}')
    commands = {
        "/set temperature": "error: /set temperature needs a value: /set NAME=VALUE",
        "/set": "error: /set needs a name and a value: /set NAME=VALUE",
        "/set max_new_tokens=1e3": "error: max_new_tokens needs an integer, got '1e3'",
        "/save": "error: /save needs a file name",
        "/load": "error: /load needs a file name",
        f"/load {null_text}": f"error: cannot load the conversation {null_text}: turn 1 needs a role (user or"
        " bot) and a text string, got role 'user' and text None",
        f"/save {tmp_path}": f"error: cannot save the conversation to {tmp_path}: it is a folder, not a file",
    }
    out = piped(bot, [*commands, "/set temperature=0.5"], monkeypatch, capsys)
    assert len(out) == len(commands) + 1 and out[-1] == "(temperature = 0.5)"
    for line, (command, expected) in zip(out, commands.items(), strict=False):
        assert line.startswith(expected), (command, line)
    assert bot.history == []


def _capped() -> None:
    """In the child: at most 2 GB of memory, so that a read without bound fails instead of
    exhausting the machine."""
    import resource

    resource.setrlimit(resource.RLIMIT_DATA, (2**31, 2**31))


def test_devices_and_fifos_are_refused_at_once(run: Path, tmp_path: Path) -> None:
    """/dev/zero never ends and a FIFO waits for a writer: /load refuses both before reading, and
    /save never replaces a FIFO. In a child process with a memory cap and a deadline."""
    os.mkfifo(tmp_path / "fifo")
    lines = ["/load /dev/zero", f"/load {tmp_path / 'fifo'}", f"/save {tmp_path / 'fifo'}", "/quit"]
    result = subprocess.run(chat_argv(run), input="\n".join(lines) + "\n", capture_output=True, text=True,
                            env=subprocess_env(), timeout=DEADLINE, preexec_fn=_capped)  # fmt: skip
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "error: cannot load the conversation /dev/zero: it is a character device, not a file; give a file"
        " written by /save",
        f"error: cannot load the conversation {tmp_path / 'fifo'}: it is a FIFO (named pipe), not a file;"
        " give a file written by /save",
        f"error: cannot save the conversation to {tmp_path / 'fifo'}: it is a FIFO (named pipe), not a file;"
        " choose a file name",
    ]
    assert (tmp_path / "fifo").is_fifo()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Writer:
    """A bot that answers with escape sequences, as a model trained on such text would."""

    answer = "\x1b]0;owned\x07hi\x1b[31m red\x9b2J\tend\x7f"

    def new_unknown_chars(self, message: str) -> list[str]:
        return []

    def stream(self, message: str) -> Iterator[str]:
        yield from (self.answer[:6], self.answer[6:])


def test_model_output_shows_control_characters_on_a_terminal_and_passes_them_to_a_pipe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from minigpt2.cli.console import shown

    assert shown("a\x1b[0mb\tc\nd\x07\x9b\x7f") == "a␛[0mb\tc\nd␇\\x9b␡"
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    repl.answer(_Writer(), "x", "bot> ")
    seen = terminal.getvalue()
    assert seen == "bot> ␛]0;owned␇hi␛[31m red\\x9b2J\tend␡\n"
    assert not any((ord(c) < 0x20 and c not in "\t\n") or 0x7F <= ord(c) < 0xA0 for c in seen)
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stdout", piped)
    repl.answer(_Writer(), "x", "")
    assert piped.getvalue() == _Writer.answer + "\n"  # a script gets the model's own characters
