"""Shared by the model tests: the logits at every position, which inference does not compute."""

from __future__ import annotations

import torch

from minigpt2.core.model import KVCache


def all_logits(model: torch.nn.Module, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
    """(B, T, V): at inference the model computes only the last position's logits, so ask as
    training does (with targets; the loss is ignored)."""
    logits, _ = model(idx, torch.zeros_like(idx), cache=cache)
    return logits
