"""Load a trained run ready to generate: on a device, with a precision, on the chosen engine.

The one place that does it, for the chatbot, ``sample``, ``eval``, the server and the notebook.
Tests: ``pytest tests/test_chat.py tests/test_cli.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from minigpt2 import checkpoint
from minigpt2.core.model import GPT
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.fast import use_engine
from minigpt2.precision import Precision, choose_device, choose_precision


@dataclass
class Loaded:
    """A model in eval mode, its tokenizer, the checkpoint it came from and the precision to run in."""

    model: GPT
    tokenizer: CharTokenizer
    ckpt: checkpoint.Checkpoint
    precision: Precision


def load_for_inference(
    run: str | Path, device: str = "auto", dtype: str = "auto", engine: str = "fast", generation: bool = True
) -> Loaded:
    """``run`` is a run directory (its ``best``), or ``RUN/best`` / ``RUN/last``. ``generation``:
    one sequence a character at a time (a CPU stays in fp32 for it), else whole windows (``eval``)."""
    dev = choose_device(device)
    model, tokenizer, ckpt = checkpoint.load_model(Path(run), dev)
    use_engine(model, engine)
    return Loaded(model, tokenizer, ckpt, choose_precision(dev, dtype, inference=generation))
