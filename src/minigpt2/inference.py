"""Load a trained run ready to generate: on a device, with a precision, on the chosen engine.

The one place that does it, for the chatbot, ``sample``, ``eval``, the server and the notebook.
Tests: ``pytest tests/test_chat.py tests/test_cli.py tests/test_int8.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from minigpt2 import checkpoint
from minigpt2.core.model import GPT
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.errors import ConfigError
from minigpt2.fast import use_engine
from minigpt2.fast.decode import FastGPT
from minigpt2.fast.int8 import DecodeWeights, choose_decode_weights
from minigpt2.precision import Precision, choose_device, choose_precision


@dataclass
class Loaded:
    """A model in eval mode, its tokenizer, the checkpoint it came from, the precision to run in and
    the weights its one-character steps read (``model.decode_weights`` on the fast engine)."""

    model: GPT
    tokenizer: CharTokenizer
    ckpt: checkpoint.Checkpoint
    precision: Precision
    decode_weights: DecodeWeights


def load_for_inference(
    run: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    engine: str = "fast",
    generation: bool = True,
    decode_weights: str = "auto",
) -> Loaded:
    """``run`` is a run directory (its ``best``), or ``RUN/best`` / ``RUN/last``. ``generation``:
    one sequence a character at a time (a CPU stays in fp32 for it), else whole windows (``eval``).
    ``decode_weights`` (auto, int8, fp32): see ``fast.int8.choose_decode_weights``; int8 is the
    fast engine's, so the reference engine decodes with the weights as trained."""
    dev = choose_device(device)
    if engine == "reference" and decode_weights == "int8":
        raise ConfigError("--decode-weights int8 belongs to the fast engine; drop it or use --engine fast")
    model, tokenizer, ckpt = checkpoint.load_model(Path(run), dev)
    use_engine(model, engine)
    weights = DecodeWeights("fp32", "the weights as trained")
    # The textbook model, or whole windows (eval): no one-character steps to read other weights.
    if isinstance(model, FastGPT) and generation:
        weights = choose_decode_weights(model, decode_weights)
        model.decode_weights = weights.name
    return Loaded(model, tokenizer, ckpt, choose_precision(dev, dtype, inference=generation), weights)
