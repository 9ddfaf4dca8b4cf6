"""Tests for ``minigpt2.core.schedule``: the learning rate at each step and the early-stopping rule.

Covered: warm-up (starts at lr / warmup_iters, never 0; reaches lr on its last step; none when
warmup_iters is 0), cosine and linear decay to min_lr and the floor after max_iters, the constant
schedule; early stopping's min_delta, NaN handling, patience count and best-loss bookkeeping.
Pure functions, no torch: ``pytest -q tests/core/test_schedule.py`` runs in well under a second.
"""

from __future__ import annotations

import itertools
import math

import pytest

from minigpt2.core.schedule import EarlyStopState, early_stop_update, lr_at

LR, MIN_LR, WARMUP, MAX = 1e-3, 1e-4, 10, 110


def at(step: int, schedule: str = "cosine", warmup: int = WARMUP) -> float:
    return lr_at(step, lr=LR, min_lr=MIN_LR, warmup_iters=warmup, max_iters=MAX, schedule=schedule)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_rises_linearly_from_lr_over_warmup_to_lr(schedule: str) -> None:
    assert at(0, schedule) == pytest.approx(LR / WARMUP)
    assert at(0, schedule) > 0
    warm = [at(s, schedule) for s in range(WARMUP)]
    assert warm == pytest.approx([LR * (s + 1) / WARMUP for s in range(WARMUP)])
    assert all(a < b for a, b in itertools.pairwise(warm))
    assert at(WARMUP - 1, schedule) == pytest.approx(LR)


def test_warmup_of_one_step_starts_at_lr() -> None:
    assert at(0, warmup=1) == pytest.approx(LR)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_reaches_min_lr_at_max_iters_and_stays(schedule: str) -> None:
    assert at(WARMUP, schedule) == pytest.approx(LR)  # decay starts from the peak
    assert at(MAX, schedule) == pytest.approx(MIN_LR)
    for step in (MAX + 1, MAX + 7, 10 * MAX):
        assert at(step, schedule) == pytest.approx(MIN_LR)
    decay = [at(s, schedule) for s in range(WARMUP, MAX + 1)]
    assert all(a > b for a, b in itertools.pairwise(decay))
    assert min(decay) >= MIN_LR - 1e-15


def test_cosine_midpoint_and_shape() -> None:
    mid = WARMUP + (MAX - WARMUP) // 2
    assert at(mid) == pytest.approx((LR + MIN_LR) / 2)
    quarter = WARMUP + (MAX - WARMUP) // 4  # cosine stays above the straight line early on
    assert at(quarter) > at(quarter, "linear")
    assert at(quarter) == pytest.approx(MIN_LR + 0.5 * (1 + math.cos(math.pi / 4)) * (LR - MIN_LR))


def test_linear_midpoint_is_mean_of_lr_and_min_lr() -> None:
    mid = WARMUP + (MAX - WARMUP) // 2
    assert at(mid, "linear") == pytest.approx((LR + MIN_LR) / 2)


def test_constant_stays_at_lr_after_warmup() -> None:
    assert [at(s, "constant") for s in (WARMUP, MAX // 2, MAX, 3 * MAX)] == [LR] * 4


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_no_warmup_starts_at_lr(schedule: str) -> None:
    assert at(0, schedule, warmup=0) == pytest.approx(LR)


def test_unknown_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown lr schedule"):
        at(WARMUP + 1, "exponential")


def fold(losses: list[float], *, patience: int = 3, min_delta: float = 0.0) -> list[tuple[bool, bool]]:
    """Feed ``losses`` (evaluated at steps 1, 2, ...) through early stopping: (improved, stop) each."""
    state, out = EarlyStopState(), []
    for step, loss in enumerate(losses, 1):
        new, improved, stop = early_stop_update(state, loss, step, min_delta=min_delta, patience=patience)
        assert new.best_loss <= state.best_loss or math.isnan(state.best_loss)  # never replaced by worse
        state = new
        out.append((improved, stop))
    return out


def test_first_finite_loss_improves_and_is_remembered() -> None:
    state, improved, stop = early_stop_update(EarlyStopState(), 2.5, 7, min_delta=0.0, patience=1)
    assert (improved, stop) == (True, False)
    assert (state.best_loss, state.best_step, state.bad_evals) == (2.5, 7, 0)


def test_improvement_must_beat_best_by_more_than_min_delta() -> None:
    start = EarlyStopState(best_loss=2.0, best_step=10, bad_evals=1)
    same, improved, _ = early_stop_update(start, 2.0 - 0.1, 20, min_delta=0.1, patience=5)
    assert not improved and same.best_loss == 2.0 and same.best_step == 10 and same.bad_evals == 2
    better, improved, _ = early_stop_update(start, 2.0 - 0.1001, 20, min_delta=0.1, patience=5)
    assert improved and better.best_step == 20 and better.bad_evals == 0
    assert not early_stop_update(start, 2.0, 20, min_delta=0.0, patience=5)[1]  # equal is no gain


def test_nan_never_improves_and_counts_as_bad() -> None:
    state, improved, stop = early_stop_update(EarlyStopState(), math.nan, 1, min_delta=0.0, patience=2)
    assert not improved and not stop and state.bad_evals == 1 and math.isinf(state.best_loss)
    state2, improved, stop = early_stop_update(state, math.nan, 2, min_delta=0.0, patience=2)
    assert not improved and stop and state2.best_step == -1


@pytest.mark.parametrize("patience", [1, 2, 4])
def test_stop_fires_exactly_after_patience_bad_evaluations(patience: int) -> None:
    losses = [3.0, 2.0, *[2.0 + 0.1 * i for i in range(1, patience + 2)]]
    result = fold(losses, patience=patience)
    stops = [i for i, (_, stop) in enumerate(result) if stop]
    assert stops[0] == 1 + patience  # best at index 1, then `patience` bad ones
    assert [imp for imp, _ in result[:2]] == [True, True]


def test_an_improvement_resets_the_bad_count() -> None:
    result = fold([3.0, 3.1, 3.2, 2.9, 3.0, 3.05, 3.1], patience=3)
    assert [stop for _, stop in result] == [False] * 6 + [True]
    assert [imp for imp, _ in result] == [True, False, False, True, False, False, False]


def test_best_is_never_replaced_by_a_worse_loss() -> None:
    state = EarlyStopState()
    for step, loss in enumerate([2.0, 2.5, 1.5, 1.7, math.nan, 9.0, 1.6], 1):
        state, _, _ = early_stop_update(state, loss, step, min_delta=0.0, patience=100)
    assert (state.best_loss, state.best_step) == (1.5, 3)
