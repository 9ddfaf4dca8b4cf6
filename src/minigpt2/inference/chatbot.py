"""Load a trained run ready to generate, and the chatbot the front ends talk to.

``load_for_inference``: a run on a device, with a precision, on the chosen engine; the one place that
does it, for the chatbot, ``sample``, ``eval``, the server and the notebook. ``Chatbot``: the
textbook's chatbot (``core/chat.py``) with what the product adds around it: ``from_run``,
``set_option`` (a sampling option by name, as ``/set`` types it), ``save``/``load`` (a conversation
kept as JSON; ``minigpt2.inference.conversation`` checks both ends) and ``next_char_probs`` (the notebook's
view of what the model was choosing from).
Tests: ``pytest tests/core/test_chat.py tests/cli/test_cli.py tests/fast/test_int8.py
tests/notebook/test_notebook.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minigpt2.core import chat
from minigpt2.core.chat import Turn, make_template
from minigpt2.core.generate import make_generator
from minigpt2.core.model import GPT, KVCache
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.errors import ConfigError, UserError
from minigpt2.fast import use_engine
from minigpt2.fast.decode import FastGPT
from minigpt2.fast.int8 import DecodeWeights, choose_decode_weights
from minigpt2.hardware.precision import Precision, choose_device, choose_precision
from minigpt2.inference import conversation
from minigpt2.inference.options import parse_option, sample_with
from minigpt2.storage import checkpoint


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
    if engine not in ("fast", "reference"):
        raise ConfigError(f"engine must be fast or reference, got {engine!r}")
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


class Chatbot(chat.Chatbot):
    """The textbook's ``Chatbot`` with a run's loading, options by name, files and the notebook's view."""

    @classmethod
    def from_run(
        cls,
        run: str | Path,
        device: str = "auto",
        dtype: str = "auto",
        template: str | None = None,
        engine: str = "fast",
        decode_weights: str = "auto",
        **kw: Any,
    ) -> Chatbot:
        """Load a trained run; the template defaults to the one its checkpoint names."""
        loaded = load_for_inference(run, device, dtype, engine, decode_weights=decode_weights)
        name = template or loaded.ckpt.meta.get("chat_template") or "dialogue"
        options = {k: kw.pop(k) for k in ("user_name", "bot_name", "speaker_end") if k in kw}
        return cls(
            loaded.model, loaded.tokenizer, make_template(name, **options), precision=loaded.precision, **kw
        )

    def set_option(self, name: str, value: str) -> None:
        """Change a sampling option given as text, e.g. ``set_option("temperature", "0.7")``; checked."""
        self.sample = sample_with(self.sample, {name: parse_option(name, value)})
        if name == "seed":
            self._generator = make_generator(self.sample.seed)

    def save(self, path: str | Path) -> None:
        """Keep the conversation as JSON; ``load`` continues it."""
        history = [dataclasses.asdict(t) for t in self.history]
        conversation.save(path, {"template": dataclasses.asdict(self.template), "history": history})

    def load(self, path: str | Path) -> None:
        """Continue a conversation saved with ``save`` (checked turn by turn; one line if refused)."""
        self.history = [Turn(role, text) for role, text in conversation.load_history(path)]

    def next_char_probs(self, k: int = 10) -> list[tuple[str, float]]:
        """The model's ``k`` likeliest first characters for its last answer, with probabilities
        (temperature 1, no filters): what it was choosing from when it began to reply."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise UserError(f"next_char_probs needs k, the number of characters to show, >= 1; got {k!r}")
        history = self.history[:-1] if self.history and self.history[-1].role == "bot" else self.history
        prompt = self.prepare(history).prompt
        autocast = self.precision.autocast() if self.precision is not None else contextlib.nullcontext()
        with torch.inference_mode(), autocast:  # the precision the answers are drawn in
            # Through a fresh cache, as an answer starts: the numbers its first character is drawn
            # from (with the engine's int8 decoding weights, the last position is an int8 step).
            cache = KVCache(self.model.config)
            logits, _ = self.model(torch.tensor([prompt], device=self.model.device), cache=cache)
        probs = torch.softmax(logits[0, -1].float(), dim=-1)
        top = torch.topk(probs, min(k, probs.numel()))
        shown = {"\n": "⏎", " ": "␣"}
        chars = self.tokenizer.decode_each(top.indices.tolist())
        return [(shown.get(c, c), float(p)) for c, p in zip(chars, top.values.tolist(), strict=True)]
