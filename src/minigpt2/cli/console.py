"""What the commands show on the terminal besides their output: stderr lines and the progress bar.

Shared by the command handlers, the chat loop and ``main``; torch-free, like everything that
``minigpt2 --help`` imports. Tests: ``pytest tests/test_cli.py tests/test_hostile_input.py``.
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


def progress_bar() -> Any:
    """A training callback drawing a tqdm bar on stderr (its messages go above the bar)."""
    from tqdm import tqdm

    from minigpt2.training.metrics import ProgressBar

    return ProgressBar(tqdm, lambda message: tqdm.write(message, file=sys.stderr))
