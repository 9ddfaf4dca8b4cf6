"""The loss ``minigpt2 eval`` reports: a trained model on a whole split, window after window.
Tests: ``pytest tests/cli/test_train_cli.py -k eval``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from minigpt2.core.batches import windows
from minigpt2.core.model import GPT
from minigpt2.errors import ConfigError


@torch.no_grad()
def evaluate_tokens(
    model: GPT, tokens: np.ndarray, batch_size: int, precision: Any, max_windows: int = 0
) -> float:
    """Mean loss over consecutive, non-overlapping context windows of ``tokens`` (a whole split,
    or its first ``max_windows`` windows): the number ``minigpt2 eval`` reports."""
    T = model.config.block_size
    starts = np.arange(0, len(tokens) - T, T)
    if max_windows:
        starts = starts[:max_windows]
    if len(starts) == 0:
        raise ConfigError(f"the split has {len(tokens)} tokens, fewer than one context window ({T + 1})")
    device = model.device
    model.eval()
    total = 0.0
    for i in range(0, len(starts), batch_size):
        x, y = windows(tokens, starts[i : i + batch_size], T)
        with precision.autocast():
            _, loss = model(x.to(device), y.to(device))
        assert loss is not None
        total += float(loss) * len(x)
    return total / len(starts)
