"""The terminal chat loop of ``minigpt2 chat`` and ``quickstart``: prompts, /commands, streamed answers.

At a terminal it prompts ``you>`` and answers ``bot>``; from a pipe it reads one message a line and
prints only the answers. Ctrl-C while the bot answers stops that answer; at the prompt it leaves,
as Ctrl-D does. A bad ``/set`` or ``/load`` prints ``error: ...`` and the chat goes on.
The bot is a ``Chatbot`` (typed ``Any`` so that this module imports no torch).
Tests: ``pytest tests/test_chat.py tests/test_hostile_input.py``.
"""

from __future__ import annotations

import sys
from typing import Any

from minigpt2.cli.console import err
from minigpt2.errors import UserError

CHAT_HELP = """commands:
  /help              this help
  /reset             forget the conversation
  /set NAME=VALUE    change a sampling option: temperature, top_k, top_p, repetition_penalty,
                     max_new_tokens, seed (e.g. /set temperature=0.7)
  /save FILE         save the conversation as JSON
  /load FILE         continue a saved conversation
  /quit              leave (so do Ctrl-D and Ctrl-C at the prompt)
Ctrl-C while the bot is answering stops that answer."""


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
    elif name == "set" and "=" in rest:
        key, _, value = rest.partition("=")
        bot.set_option(key.strip().replace("-", "_"), value.strip())
        print(f"({key.strip()} = {value.strip()})")
    elif name in ("save", "load") and rest:
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
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write(" [stopped]")
    finally:
        stream.close()
    sys.stdout.write("\n")
    sys.stdout.flush()


def converse(bot: Any, run: str) -> int:
    """Chat until /quit, Ctrl-D, Ctrl-C at the prompt or the end of piped input; the exit status."""
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {run} ({bot.template.name} template); /help for commands, Ctrl-D to quit")
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not interactive and not line:  # end of the piped input
            return 0
        line = line.rstrip("\r\n")
        if line.startswith("/"):
            try:
                if not chat_command(bot, line):
                    return 0
            except UserError as error:  # a bad /set or /load is the user's typo, not fatal
                print(f"error: {error}")
            continue
        if line.strip():
            answer(bot, line, "bot> " if interactive else "")
