"""What the commands show on the terminal besides their output: stderr lines and the progress bar.

Shared by the command handlers, the chat loop and ``main``; torch-free, like everything that
``minigpt2 --help`` imports. Tests: ``pytest tests/cli/test_cli.py tests/promises/test_hostile_input.py``.
"""

from __future__ import annotations

import sys
from typing import Any


def err(message: str) -> None:
    """One line on stderr, flushed at once so that it lands before what stdout shows next."""
    print(message, file=sys.stderr, flush=True)


def warn_unknown(tokenizer: Any, text: str) -> None:
    """Tell the user, once per call, which characters the model has never seen."""
    unknown = tokenizer.unknown_chars(text)
    if unknown:
        shown = " ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        err(f"warning: the model never saw {len(unknown)} of these characters; they become <|unk|>: {shown}")


# What a terminal would obey rather than show: C0 controls but tab and line feed, DEL, C1 controls.
_CONTROLS = {c: (chr(0x2400 + c) if c < 0x20 else "\u2421" if c == 0x7F else f"\\x{c:02x}")
             for c in (*range(0x20), *range(0x7F, 0xA0)) if c not in (0x09, 0x0A)}  # fmt: skip


def shown(text: str) -> str:
    """``text`` as a terminal should show model output: control characters as visible symbols
    (ESC as ␛, a C1 control as ``\x9b``), so that a model trained on text holding escape sequences
    cannot retitle, recolour or clear the terminal of whoever reads it. Tabs and line breaks stay."""
    return text.translate(_CONTROLS)


def write_output(text: str) -> None:
    """Model output to stdout: shown visibly on a terminal (``shown``), as it is into a pipe or file
    (a script reading it gets the model's characters)."""
    sys.stdout.write(shown(text) if sys.stdout.isatty() else text)


def progress_bar() -> Any:
    """A training callback drawing a tqdm bar on stderr (its messages go above the bar)."""
    from tqdm import tqdm

    from minigpt2.training.metrics import ProgressBar

    return ProgressBar(tqdm, lambda message: tqdm.write(message, file=sys.stderr))
