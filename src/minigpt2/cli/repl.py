"""The terminal chat loop of ``minigpt2 chat`` and ``quickstart``: prompts, /commands, streamed answers.

At a terminal it prompts ``you>`` and answers ``bot>``; from a pipe it reads one message a line and
prints only the answers. Ctrl-C while the bot answers stops that answer; at the prompt it leaves,
as Ctrl-D does. A bad ``/set``, ``/save`` or ``/load`` prints ``error: ...`` and the chat goes on.

At a terminal the line is read through ``readline`` where Python has it: arrow keys move in the
line, Up and Down recall this chat's earlier lines (kept in memory only, never written to a file),
Ctrl-L clears the screen, and a pasted line of any length arrives whole. Without it the terminal's
own line editing applies, which keeps at most ``TTY_LINE_MAX`` bytes of a line and drops the rest:
a line of exactly that length gets a note that it may have been cut. Control characters and
terminal escape sequences (a stray arrow key) are taken out of every line, typed or piped.
The bot is a ``Chatbot`` (typed ``Any`` so that this module imports no torch).
Tests: ``pytest tests/cli/test_repl.py tests/core/test_chat.py tests/promises/test_hostile_input.py``.
"""

from __future__ import annotations

import io
import re
import sys
import textwrap
from typing import Any

from minigpt2.cli.console import err, write_output
from minigpt2.errors import UserError
from minigpt2.inference.options import OPTIONS

# The options /set takes are SampleConfig's fields (inference.options.OPTIONS), which also checks them.
SET_HELP = textwrap.fill(
    f"change a sampling option: {', '.join(OPTIONS)} (e.g. /set temperature=0.7)",
    width=100, initial_indent="  /set NAME=VALUE    ", subsequent_indent=" " * 21,
)  # fmt: skip
CHAT_HELP = f"""commands:
  /help              this help
  /reset             forget the conversation
{SET_HELP}
  /save FILE         save the conversation as JSON
  /load FILE         continue a saved conversation
  /quit              leave (so do Ctrl-D and Ctrl-C at the prompt)
Ctrl-C while the bot is answering stops that answer."""

# Linux's terminal line buffer holds 4096 bytes, the newline included: a longer line typed or pasted
# without readline reaches the program cut to this many bytes, with no sign of the cut.
TTY_LINE_MAX = 4095
# Escape sequences (ESC [ ... final byte; ESC O x; ESC and one character) and the other C0 and C1
# control characters; a tab stays.
CONTROL = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|O.|.)?|[\x00-\x08\x0a-\x1f\x7f-\x9f]", re.DOTALL)


def chat_command(bot: Any, line: str) -> bool:
    """Run a /command; False means quit."""
    name, _, rest = line[1:].partition(" ")
    rest = rest.strip()
    if name in ("quit", "exit", "q"):
        return False
    if name == "help":
        print(CHAT_HELP)
    elif name == "reset":
        bot.reset()
        print("(conversation forgotten)")
    elif name == "set":
        key, equals, value = (part.strip() for part in rest.partition("="))
        if not (key and equals and value):
            what = f"/set {key} needs a value" if key and not value else "/set needs a name and a value"
            raise UserError(f"{what}: /set NAME=VALUE, e.g. /set {key or 'temperature'}=0.7")
        bot.set_option(key.replace("-", "_"), value)
        print(f"({key} = {value})")
    elif name in ("save", "load"):
        if not rest:
            raise UserError(f"/{name} needs a file name: /{name} FILE, e.g. /{name} chat.json")
        getattr(bot, name)(rest)
        print(f"(conversation {'saved to' if name == 'save' else 'loaded from'} {rest})")
    else:
        print(f"unknown command {line!r}; /help lists them")
    return True


def answer(bot: Any, message: str, prefix: str) -> None:
    """Stream one answer to stdout; Ctrl-C stops this answer only."""
    warn = bot.new_unknown_chars(message)
    if warn:
        err(f"note: the model never saw {' '.join(repr(c) for c in warn[:10])}; they become <|unk|>")
    sys.stdout.write(prefix)
    stream = bot.stream(message)
    try:
        for piece in stream:
            write_output(piece)  # control characters made visible on a terminal
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write(" [stopped]")
    finally:
        stream.close()
    sys.stdout.write("\n")
    sys.stdout.flush()


def line_editing() -> bool:
    """Let ``input()`` edit lines with ``readline`` (arrow keys, Up for history, Ctrl-L), where Python
    has it. Its history lives in memory for this chat; nothing is read from or written to a history
    file. False where there is no readline (Windows, some builds)."""
    try:
        import readline
    except ImportError:
        return False
    readline.set_auto_history(True)  # every line entered joins the history (the default, made explicit)
    return True


def clean(line: str) -> str:
    """The line without control characters and escape sequences, and with bytes that were not UTF-8
    (read as surrogates: a character cut at the terminal's limit, a binary pipe) as U+FFFD."""
    line = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return CONTROL.sub("", line)


def cut_note(line: str) -> str | None:
    """A note for a typed line that fills the terminal's line buffer, so was probably cut."""
    if len(line.encode("utf-8", "surrogateescape")) != TTY_LINE_MAX:
        return None
    return (f"note: this message is {TTY_LINE_MAX} bytes long, as much as a terminal line holds: the"
            " terminal may have cut it. Send long text through a pipe (minigpt2 chat RUN < FILE) or"
            ' with --prompt "$(cat FILE)"')  # fmt: skip


def read_line(interactive: bool) -> str | None:
    """The next line, without its line end; None at the end of the input, Ctrl-D or Ctrl-C."""
    try:
        line = input("you> ") if interactive else sys.stdin.readline()
    except (EOFError, KeyboardInterrupt):
        print()
        return None
    if not interactive and not line:  # end of the piped input
        return None
    return line.rstrip("\r\n")


def converse(bot: Any, run: str) -> int:
    """Chat until /quit, Ctrl-D, Ctrl-C at the prompt or the end of piped input; the exit status."""
    interactive = sys.stdin.isatty()
    if isinstance(sys.stdin, io.TextIOWrapper):  # bytes that are not UTF-8 are cleaned, not fatal
        sys.stdin.reconfigure(errors="surrogateescape")
    if interactive:
        line_editing()
        weights = getattr(bot.model, "decode_weights", "fp32")  # the fast engine's (--decode-weights)
        print(f"chatting with {run} ({bot.template.name} template, {weights} decoding weights); "
              "/help for commands, Ctrl-D to quit")  # fmt: skip
    while (raw := read_line(interactive)) is not None:
        note = cut_note(raw) if interactive else None
        line = clean(raw)
        if line.startswith("/"):
            try:
                if not chat_command(bot, line):
                    return 0
            except UserError as error:  # a bad /set, /save or /load is the user's typo, not fatal
                print(f"error: {error}")
            continue
        if note:
            err(note)
        if line.strip():
            answer(bot, line, "bot> " if interactive else "")
    return 0
