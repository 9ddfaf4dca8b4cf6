"""Watching it learn: at each evaluation, what the model says now, kept in ``RUN/samples.jsonl``.

For a dialogue corpus, its replies to the first user messages of the validation conversations
(two or three of them); for plain text, a continuation of the start of the validation text (or of
``sample_prompts``, if set). Short and seeded from the run's seed, so the same run shows the same
samples, and the learner sees gibberish turn into words as the val loss falls. Each line of the
file is ``{"step", "val_loss", "prompt", "text"}``; the callbacks get them too (``on_samples``:
under the progress bar, in the notebook's live plot).

Sampling costs a few hundred characters of generation per evaluation; so that it stays under
``MAX_SHARE`` of training time on any model, an evaluation skips it while the time spent sampling
is over that share of the time trained (the first evaluation always samples).
Tests: ``pytest tests/training/test_samples.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt2.core.chat import Chatbot, DialogueTemplate, Turn
from minigpt2.core.config import SampleConfig, TrainConfig
from minigpt2.core.model import GPT
from minigpt2.core.stream import stream_text
from minigpt2.core.tokenizer import EOT_ID, USER_ID, CharTokenizer
from minigpt2.hardware.precision import Precision
from minigpt2.storage.fileio import atomic_write_text

MAX_SHARE = 0.05  # of training time, at most, spent writing samples
REPLY_CHARS, TEXT_CHARS = 80, 120  # short: a glimpse, not a benchmark
N_PROMPTS = 3
FILE = "samples.jsonl"


def default_prompts(val: np.ndarray, tokenizer: CharTokenizer, dialogue: bool) -> list[str]:
    """The first user messages of the validation split (dialogue), or its first line (text)."""
    ids = val[:20_000].tolist()
    if dialogue:
        prompts = []
        for start in (i for i, t in enumerate(ids) if t == USER_ID):
            end = ids.index(EOT_ID, start) if EOT_ID in ids[start:] else len(ids)
            text = tokenizer.decode(ids[start + 1 : end]).strip()
            if text and text not in prompts:
                prompts.append(text[:100])
            if len(prompts) == N_PROMPTS:
                break
        return prompts
    text = tokenizer.decode(ids[:200]).lstrip()
    first_line = text.split("\n", 1)[0].strip()
    return [first_line[:40] if first_line else text[:40]]


class SampleWriter:
    """Makes and keeps the samples of one run (rank 0 only)."""

    def __init__(
        self, run_dir: Path, cfg: TrainConfig, tokenizer: CharTokenizer, val: np.ndarray, kind: str | None
    ) -> None:
        self.path, self.tokenizer, self.dialogue = run_dir / FILE, tokenizer, kind == "dialogue"
        given = [p for p in cfg.sample_prompts.split("|") if p.strip()]
        self.prompts = given or default_prompts(val, tokenizer, self.dialogue)
        self.seed, self.spent = cfg.seed, 0.0

    def keep_until(self, step: int) -> None:
        """Keep only the samples of steps up to ``step`` (a resumed run goes on from there)."""
        if not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if (n := _step_of(line)) is not None and n <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def due(self, elapsed: float) -> bool:
        return self.spent == 0.0 or self.spent <= MAX_SHARE * elapsed

    def write(self, model: GPT, step: int, val_loss: float, precision: Precision) -> list[dict[str, Any]]:
        """Generate one sample per prompt, append them to the file, and return them."""
        start = time.perf_counter()
        # Dropout off while it speaks: a sample shows the model as it will be used, and draws nothing
        # from the random state the training's dropout goes on from (a resumed run repeats it).
        training = model.training
        model.eval()
        try:
            samples = [
                {
                    "step": step,
                    "val_loss": round(val_loss, 4),
                    "prompt": prompt,
                    "text": self._say(model, prompt, precision, i),
                }
                for i, prompt in enumerate(self.prompts)
            ]
        finally:
            model.train(training)
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        self.spent += time.perf_counter() - start
        return samples

    def _say(self, model: GPT, prompt: str, precision: Precision, i: int) -> str:
        chars = REPLY_CHARS if self.dialogue else TEXT_CHARS
        sample = SampleConfig(max_new_tokens=chars, temperature=0.8, top_k=40, seed=self.seed + i)
        if self.dialogue:
            bot = Chatbot(model, self.tokenizer, DialogueTemplate(), sample, precision)
            return "".join(bot.answer([Turn("user", prompt)]))
        generator = torch.Generator().manual_seed(sample.seed or 0)
        pieces = stream_text(model, self.tokenizer, prompt, sample, stop_ids=(), precision=precision,
                             generator=generator)  # fmt: skip
        return "".join(pieces)


def _step_of(line: str) -> int | None:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None  # a line cut short by a crash
    return step if isinstance(step, int) else None
