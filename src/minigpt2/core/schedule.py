"""The numeric decisions of training as pure functions: learning rate at a step, and early stopping.

Pure so that one assert tests each: no globals, no clocks, no I/O.
Tests: ``pytest tests/core/test_schedule.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def lr_at(
    step: int,
    *,
    lr: float,
    min_lr: float,
    warmup_iters: int,
    max_iters: int,
    schedule: str = "cosine",
) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    a. Warm-up (technique 4): rises linearly over ``warmup_iters`` steps, from ``lr / warmup_iters`` at step 0
       (never 0: a zero step wastes a batch) to ``lr`` at step ``warmup_iters - 1``. Early updates
       from a random model are large and noisy; a small LR keeps Adam's moment estimates sane.
    b. Decay (technique 3, the schedule): from ``lr`` down to ``min_lr`` at ``max_iters`` (cosine,
       linear), or flat (constant).
    c. After ``max_iters``: stays at ``min_lr``.
    """
    if step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_iters) / max(1, max_iters - warmup_iters))
    if schedule == "linear":
        return lr - progress * (lr - min_lr)
    if schedule == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    raise ValueError(f"unknown lr schedule {schedule!r}")


@dataclass(frozen=True)
class EarlyStopState:
    """What early stopping remembers between evaluations."""

    best_loss: float = math.inf
    best_step: int = -1
    bad_evals: int = 0  # evaluations in a row without an improvement


def early_stop_update(
    state: EarlyStopState, val_loss: float, step: int, *, min_delta: float, patience: int
) -> tuple[EarlyStopState, bool, bool]:
    """Fold one evaluation in: returns (new state, improved, stop).

    An evaluation improves when it beats the best loss by more than ``min_delta``; the caller then
    saves the model as ``best``. After ``patience`` evaluations in a row without one, ``stop``.
    A NaN loss never counts as an improvement.
    """
    if val_loss < state.best_loss - min_delta:
        return EarlyStopState(val_loss, step, 0), True, False
    bad = state.bad_evals + 1
    return EarlyStopState(state.best_loss, state.best_step, bad), False, bad >= patience
