"""Batches: the windows of text a model trains on, read from a folder that ``minigpt2 prepare`` wrote.

A prepared data folder holds ``train.bin`` and ``val.bin`` (the two splits, one uint16 token id per
character) and ``meta.json`` (the vocabulary, and whether the corpus is plain text or dialogue).
A training example is a *window*: ``T + 1`` consecutive ids from a random place in a split. The
model reads the first ``T`` (``x``) and, at every position, learns to predict the next id: ``y`` is
the same window shifted by one. So one window of 128 characters is 128 predictions at once.

A chatbot can learn from the bot's turns only (``loss_on="bot"``): the user's words stay in ``x`` as
context, but their targets in ``y`` become -1, which the model's loss skips (``bot_mask``).

The training loop (``core/train.py``) draws a fresh random batch for every step, and evaluates on
the same validation windows every time, so that two evaluations differ because the model did, not
the sample. Tests: ``pytest tests/core/test_batches.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from minigpt2.core.tokenizer import BOT_ID, USER_ID, CharTokenizer


def read_split(data_dir: Path, split: str) -> np.ndarray:
    """One split ("train" or "val") of a prepared data folder, memory-mapped: a big corpus costs no RAM."""
    return np.memmap(data_dir / f"{split}.bin", dtype=np.uint16, mode="r")


def read_data_folder(data_dir: Path) -> tuple[np.ndarray, np.ndarray, CharTokenizer, dict[str, Any]]:
    """The train and val splits, the vocabulary and ``meta.json`` of a prepared data folder."""
    meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))
    tokenizer = CharTokenizer.from_dict(meta["tokenizer"])
    return read_split(data_dir, "train"), read_split(data_dir, "val"), tokenizer, meta


def random_starts(n_tokens: int, batch_size: int, block_size: int, generator: torch.Generator) -> np.ndarray:
    """``batch_size`` random window starts in a split of ``n_tokens``, drawn from ``generator``
    (its state is all a resumed run needs to draw the same batches again)."""
    return torch.randint(n_tokens - block_size, (batch_size,), generator=generator).numpy()


def windows(
    data: np.ndarray, starts: np.ndarray, block_size: int, target_mask: np.ndarray | None = None
) -> tuple[Tensor, Tensor]:
    """Inputs ``x`` and next-character targets ``y``, both (B, T), for windows beginning at ``starts``.

    With ``target_mask`` (as long as ``data``), targets where it is False become -1: no loss there.
    """
    index = np.asarray(starts)[:, None] + np.arange(block_size + 1)  # (B, T+1)
    xy = torch.from_numpy(data[index].astype(np.int64))
    x, y = xy[:, :-1], xy[:, 1:].clone()  # y is x shifted by one: the next character everywhere
    if target_mask is not None:
        y[~torch.from_numpy(target_mask[index[:, 1:]])] = -1
    return x, y


def get_batch(
    data: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """A random batch ``(x, y)``, each (B, T), from one split."""
    return windows(data, random_starts(len(data), batch_size, block_size, generator), block_size)


def bot_mask(tokens: np.ndarray) -> np.ndarray:
    """True at every token of a bot turn after its ``<|bot|>`` marker, the closing ``<|eot|>``
    included: the tokens a chatbot is trained to produce when the loss counts bot turns only."""
    tokens = np.asarray(tokens)
    role = np.where(tokens == USER_ID, 1, np.where(tokens == BOT_ID, 2, 0))  # 1 user, 2 bot marker
    # For every position, where the latest role marker is (0 before the first one).
    last_marker = np.maximum.accumulate(np.where(role > 0, np.arange(len(tokens)), 0))
    return (role[last_marker] == 2) & (tokens != BOT_ID)


# One forward/backward pass of a step: x (B, T), y (B, T), and the weight of its mean loss in the
# step's loss (a number, or a 0-d tensor where it depends on how many targets count).
Pass = tuple[Tensor, Tensor, "Tensor | float"]


@dataclass
class Batches:
    """The training loop's batches: random windows of the train split for each step
    (``passes``), the same fixed windows of the val split at each evaluation (``val``)."""

    train: np.ndarray
    val: np.ndarray
    block_size: int  # T
    batch_size: int  # B: windows per micro-batch
    grad_accum: int = 1  # micro-batches whose gradients add up to one step
    eval_iters: int = 20  # validation batches per evaluation
    bot_only: bool = False  # count the loss on the bot's turns only (``bot_mask``)
    seed: int = 1337
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)  # the training batches
        self.masks = (bot_mask(self.train), bot_mask(self.val)) if self.bot_only else (None, None)
        fixed = torch.Generator().manual_seed(self.seed + 1)  # its own: the same windows every time
        self.val_starts = [self.starts(len(self.val), fixed) for _ in range(self.eval_iters)]

    def starts(self, n_tokens: int, generator: torch.Generator) -> np.ndarray:
        """The starts of one batch's windows (the product's trainer draws each process's share)."""
        return random_starts(n_tokens, self.batch_size, self.block_size, generator)

    def passes(self) -> Iterator[Pass]:
        """One step's micro-batches, each with weight ``1 / grad_accum``: the step's loss is their
        mean, and its gradients those of one batch ``grad_accum`` times as big (exactly so when the
        micro-batches count as many targets each: always, unless only the bot's turns count)."""
        for _ in range(self.grad_accum):
            starts = self.starts(len(self.train), self.generator)
            x, y = windows(self.train, starts, self.block_size, self.masks[0])
            yield (
                x.to(self.device, non_blocking=True),
                y.to(self.device, non_blocking=True),
                1 / self.grad_accum,
            )

    def val_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The fixed validation batches, (x, y) each (B, T)."""
        for starts in self.val_starts:
            x, y = windows(self.val, starts, self.block_size, self.masks[1])
            yield x.to(self.device), y.to(self.device)
