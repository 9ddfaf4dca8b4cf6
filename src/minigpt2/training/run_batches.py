"""The textbook's batches (``core/batches.py``) as a product run draws them: each process's share
of one global batch under DDP, micro-batches in passes of at most ``max_pass_tokens`` tokens, and
DDP's gradient averaging on the step's last pass only.

Nothing here changes what a step computes: N processes see exactly what one process with an N times
larger batch would, and a micro-batch cut into passes gives the gradients of the whole (each piece's
mean loss is weighted by its share of the counted targets). Tests: ``pytest tests/training/test_train.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch

from minigpt2.core.batches import Batches, Pass, random_starts


@dataclass
class RunBatches(Batches):
    """``Batches`` for process ``rank`` of ``world_size``, in passes of ``pass_size`` sequences."""

    rank: int = 0
    world_size: int = 1
    pass_size: int = 0  # sequences per forward/backward pass; 0: the whole micro-batch
    # DDP's ``no_sync``: the passes before a step's last one keep their gradients local.
    no_sync: Callable[[], AbstractContextManager[object]] | None = None

    def starts(self, n_tokens: int, generator: torch.Generator) -> np.ndarray:
        """This process's slice of one global batch: every process draws the same global batch
        (the generators start from the same seed), so the slices never overlap."""
        B = self.batch_size
        everyone = random_starts(n_tokens, B * self.world_size, self.block_size, generator)
        return everyone[self.rank * B : (self.rank + 1) * B]

    def passes(self) -> Iterator[Pass]:
        """Each micro-batch of ``Batches.passes`` cut into pieces of ``pass_size`` sequences. A
        piece's weight is its share of the micro-batch's counted targets (all of them, or only the
        bot's with ``bot_only``) times the micro-batch's, so the pieces' weighted mean losses add up
        to the micro-batch's mean loss."""
        size, masked = self.pass_size or self.batch_size, self.bot_only
        for i, (x, y, weight) in enumerate(super().passes()):
            # Without a loss mask every target counts: the shares are plain numbers (no tensor ops).
            counted = (y != -1).sum().clamp(min=1) if masked else y.numel()  # tensor: no GPU wait
            pieces = list(zip(torch.split(x, size), torch.split(y, size), strict=True))
            for j, (xp, yp) in enumerate(pieces):
                share = ((yp != -1).sum() if masked else yp.numel()) / counted
                last = i == self.grad_accum - 1 and j == len(pieces) - 1
                # The forward and backward of this piece run while the generator waits here, so
                # under ``no_sync`` DDP keeps the gradients local; the step's last pass averages them.
                local = contextlib.nullcontext() if last or self.no_sync is None else self.no_sync()
                with local:
                    yield xp, yp, share * weight
