"""The ``minigpt2`` command: the only package that reads argv/stdin or prints.

Each subcommand parses its options and calls one library function. The files:

- ``parser.py``: the argument parser (``build_parser``), one subparser per command and the option
  groups they share; each subparser names its handler.
- ``train_commands.py``: the handlers that make and measure models (prepare, train, eval, presets,
  export, import-hf).
- ``chat_commands.py``: the handlers that talk with a model (sample, chat, quickstart, serve).
- ``repl.py``: the terminal chat loop (its /commands, streamed answers, Ctrl-C).
- ``console.py``: stderr lines and the training progress bar.
- here: ``main``, which runs the handler and turns failures into exit statuses.

Bad input raises ``UserError`` somewhere below; ``main`` makes it one line on stderr and exit status
2, without a traceback, and so it does for an output that cannot be written (``OUTPUT_ERRNOS``: full
disk, read-only folder). torch is imported only inside the handlers, so ``minigpt2 --help`` starts
instantly. Tests: ``pytest tests/cli/test_cli.py tests/cli/test_train_cli.py
tests/promises/test_hostile_input.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import signal
from collections.abc import Callable, Sequence

from minigpt2.cli.console import err
from minigpt2.cli.parser import build_parser
from minigpt2.errors import UserError

__all__ = ["OUTPUT_ERRNOS", "Handler", "build_parser", "main", "run"]

Handler = Callable[[argparse.Namespace], int]
# OS errors that mean "this output cannot be written": reported as one line, like a UserError.
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                 getattr(errno, "EDQUOT", errno.ENOSPC)}  # fmt: skip


def run(argv: Sequence[str] | None = None) -> int:
    """The ``minigpt2`` command: ``main``, then Ctrl-C ignored while the process exits. A second
    Ctrl-C right after the one that stopped a training would otherwise land in the interpreter's
    shutdown, which prints a traceback ("Exception ignored in: <module 'threading'>") after the
    run was saved and said so."""
    code = main(argv)
    with contextlib.suppress(ValueError):  # only the main thread handles signals
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.func
    try:
        return handler(args)
    except UserError as error:
        err(f"error: {error}")
        return 2
    except KeyboardInterrupt:
        err("interrupted")
        return 130
    except BrokenPipeError:  # e.g. `minigpt2 sample ... | head`
        return 0
    except OSError as error:  # a write the library did not word itself: full disk, read-only folder
        if error.errno not in OUTPUT_ERRNOS:
            raise
        where = f": {error.filename}" if error.filename else ""
        err(f"error: {error.strerror}{where}; check that the output folder is writable and has free space")
        return 2
