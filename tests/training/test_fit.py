"""Tests for ``minigpt2.training.fit``: the model's width fitted to this machine and a time budget.

The choice is checked with step times the test chooses (no test depends on this machine's speed):
the preset's width stays where it gets ``MIN_STEPS`` steps into the budget, a narrower one is
chosen where it does not, the narrowest where none does; the trainer records the choice in
``config.json`` and the log, starts from the same random state as a run of that width, and never
refits a resumed run; ``train`` fits only without a preset, with a budget and no width given.
Run with ``pytest tests/training/test_fit.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers_train import main, prepare, rows, train_args
from minigpt2.core import config
from minigpt2.core.config import ModelConfig, TrainConfig
from minigpt2.training import fit
from minigpt2.training.run_configs import configs_for_training

CHAT = config.resolve("chat")


def seconds_by_width(table: dict[int, float]) -> tuple[list[int], object]:
    """A step timer reading ``table`` (width -> seconds), and the widths it was asked for."""
    asked: list[int] = []

    def seconds(model_cfg: ModelConfig) -> float:
        asked.append(model_cfg.n_embd)
        return table[model_cfg.n_embd]

    return asked, seconds


def test_the_ladder_goes_down_from_the_presets_width_in_whole_heads() -> None:
    assert fit.widths(ModelConfig(n_embd=256, n_head=4)) == [256, 192, 128, 96, 64]
    assert fit.widths(ModelConfig(n_embd=384, n_head=6)) == [384, 192, 96]  # 6 heads of 16 or more
    assert fit.widths(ModelConfig(n_embd=32, n_head=2)) == [32]  # heads of 16 at least


def test_a_fast_machine_keeps_the_preset_after_timing_its_width_alone() -> None:
    model_cfg, train_cfg = CHAT  # 8 minutes, batch 32, 2,500 steps
    asked, seconds = seconds_by_width({256: 0.25, 192: 0.1, 128: 0.05})
    chosen = fit.fit_to_budget(model_cfg, train_cfg, seconds)  # type: ignore[arg-type]
    assert asked == [256] and (chosen.n_embd, chosen.batch_size) == (256, 32)
    assert chosen.max_iters == max(2500, math.ceil(fit.HEADROOM * 480 * fit.TRAINING_SHARE / 0.25))
    assert "keeps width 256, batch 32 and dropout 0.1" in chosen.note() and "8 minutes" in chosen.note()
    model, train = chosen.apply(model_cfg, train_cfg)
    assert model == model_cfg and train.batch_size == 32 and train.max_iters == chosen.max_iters


def test_a_slow_machine_narrows_to_the_widest_that_gets_its_steps_at_half_the_batch() -> None:
    model_cfg, train_cfg = CHAT
    budget = train_cfg.max_minutes * 60 * fit.TRAINING_SHARE
    just = budget / (fit.MIN_STEP_SHARE * train_cfg.max_iters)  # the seconds a step may take
    asked, seconds = seconds_by_width({256: 3 * just, 192: 1.01 * just, 128: 0.99 * just, 96: 0.5 * just})
    chosen = fit.fit_to_budget(model_cfg, train_cfg, seconds)  # type: ignore[arg-type]
    assert chosen.n_embd == 128 and asked == [256, 192, 128]
    assert chosen.batch_size == 16 and chosen.dropout == 0  # narrowed: more and smaller steps, no dropout
    # The budget ends the run, not the preset's step count: room for twice the steps expected.
    assert chosen.max_iters == math.ceil(fit.HEADROOM * budget / (0.99 * just) * 2)
    assert "narrows width 256 to 128, batch 32 to 16, dropout 0.1 to 0" in chosen.note()
    assert chosen.to_dict()["step_seconds"] == {"256": 3 * just, "192": 1.01 * just, "128": 0.99 * just}
    asked, seconds = seconds_by_width(dict.fromkeys((256, 192, 128, 96, 64), 10 * just))
    slowest = fit.fit_to_budget(model_cfg, train_cfg, seconds)  # type: ignore[arg-type]
    assert slowest.n_embd == 64  # none fits: the narrowest


def test_the_real_timer_times_a_real_step() -> None:
    model_cfg = ModelConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32)
    train_cfg = TrainConfig(batch_size=4, dtype="fp32", max_minutes=1, fit_to_budget=True)
    assert 0 < fit.time_step(model_cfg, train_cfg, torch.device("cpu"), pass_seqs=2) < 60


def test_the_trainer_narrows_records_and_starts_from_the_same_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    d = prepare(tmp_path)
    # A budget of 1.2 s: width 32 would take a minute a step, width 16 fits 2 steps (half of 4).
    monkeypatch.setattr(fit, "time_step", lambda c, *a: {32: 60.0, 16: 0.01}[c.n_embd])
    budget = ("--max-minutes", 0.02, "--eval-interval", 10**6, "--n-head", 1, "--no-samples")
    fitted = train_args(d, tmp_path / "fitted", "--max-iters", 4, "--fit-to-budget", *budget)
    rc, out, err = main(capsys, *fitted)
    assert rc == 0, err
    assert "narrows width 32 to 16, batch 8 to 4, dropout 0 to 0" in out + err
    saved = json.loads((tmp_path / "fitted" / "config.json").read_text())
    assert saved["model"]["n_embd"] == 16 and saved["train"]["batch_size"] == 4
    assert saved["fit"]["preset"] == {"n_embd": 32, "batch_size": 8, "dropout": 0.0, "max_iters": 4}
    max_iters = saved["train"]["max_iters"]
    assert max_iters == saved["fit"]["max_iters"] > 4  # the budget ends the run, not the preset's 4
    # The same random state as a run of those settings from the start: the timing's draws were its own.
    direct = train_args(d, tmp_path / "direct", "--max-iters", max_iters, "--n-embd", 16, "--batch-size", 4,
                        *budget)  # fmt: skip
    assert main(capsys, *direct)[0] == 0
    first, second = rows(tmp_path / "fitted"), rows(tmp_path / "direct")
    # Each ran the steps its 1.2 s allowed, and from step 10 on the LR decays over the steps expected
    # at the speed so far: the first 10 steps are the ones a seed alone decides.
    both = min(len(first), len(second), 10)
    assert both >= 1 and [r["train_loss"] for r in first[:both]] == [r["train_loss"] for r in second[:both]]
    # A resumed run keeps its settings: nothing is timed again.
    monkeypatch.setattr(fit, "time_step", lambda *a: pytest.fail("a resumed run was fitted again"))
    more = len(first) + 2
    resumed = main(
        capsys, *train_args(d, tmp_path / "fitted", "--resume", "--max-iters", more, "--max-minutes", 0)
    )
    assert resumed[0] == 0 and len(rows(tmp_path / "fitted")) == more
    again = json.loads((tmp_path / "fitted" / "config.json").read_text())
    assert again["fit"] == saved["fit"] and again["model"]["n_embd"] == 16  # the record stays


@pytest.mark.parametrize(
    ("preset", "given", "fitted"),
    [
        (None, {"max_minutes": 5.0}, True),  # `train --max-minutes 5`: the default preset, fitted
        ("cpu", {"max_minutes": 5.0}, False),  # a preset named is trained as it is
        (None, {"max_minutes": 5.0, "n_embd": 128}, False),  # a width given is kept
        (None, {"max_minutes": 5.0, "max_iters": 10**6}, False),  # so are a step count, a batch
        (None, {"max_minutes": 5.0, "batch_size": 8}, False),
        (None, {"max_minutes": 5.0, "fit_to_budget": False}, False),
        (None, {}, False),  # no budget to fit
    ],
)
def test_train_fits_only_without_a_preset_a_width_or_a_budget_to_fill(
    preset: str | None, given: dict[str, object], fitted: bool
) -> None:
    assert configs_for_training(preset, {}, given)[1].fit_to_budget == fitted


def test_fit_to_budget_without_a_budget_is_refused() -> None:
    with pytest.raises(config.ConfigError, match="fit_to_budget needs a time budget"):
        TrainConfig(fit_to_budget=True)
