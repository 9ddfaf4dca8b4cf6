"""The textbook's training loop (``core/train.py``) on its own, and the product's trainer built on it.

Covered: ``python -m minigpt2.core.train DATA --out RUN`` trains and keeps ``RUN/best``, which the
product opens and chats with (``model.pt`` read without unpickling code); its bad input ends with
one line and exit status 2, and it never writes over a trained run; the product's ``minigpt2
train`` with the textbook engine takes exactly the steps the textbook loop takes on its own (same
losses, same evaluations): one loop, not two. Tiny configs on CPU.
Run: ``pytest -q tests/core/test_core_train.py``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from helpers_train import prepare, rows, run_module, tiny
from minigpt2.core.batches import Batches, read_data_folder
from minigpt2.core.model import GPT
from minigpt2.core.optim import make_optimizer
from minigpt2.core.precision import Precision
from minigpt2.core.train import Report, train
from minigpt2.errors import CheckpointError
from minigpt2.inference.chatbot import Chatbot
from minigpt2.storage import checkpoint
from minigpt2.training import trainer as product


def test_the_textbook_trains_a_run_the_product_chats_with(tmp_path: Path) -> None:
    d, run = prepare(tmp_path), tmp_path / "run"
    done = run_module(
        "minigpt2.core.train", d, "--out", run, "--preset", "tiny", "--max-iters", 20, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "step 10: train loss" in done.stdout and "stopped: reached max_iters (20)" in done.stdout
    assert sorted(p.name for p in (run / "best").iterdir()) == ["checkpoint.json", "model.pt"]
    ckpt = checkpoint.load(run)
    assert ckpt.meta["step"] in (10, 20) and ckpt.meta["chat_template"] == "play"
    bot = Chatbot.from_run(run)
    assert isinstance(bot.reply("the quick brown fox"), str) and len(bot.history) == 2
    # And the command line's chat opens it too.
    chat = run_module("minigpt2", "sample", run, "--prompt", "the", "--max-new-tokens", 10, cwd=tmp_path)
    assert chat.returncode == 0, chat.stderr


def test_the_textbook_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    d, run = prepare(tmp_path), tmp_path / "run"
    missing = run_module("minigpt2.core.train", tmp_path / "nope", "--out", run, cwd=tmp_path)
    assert missing.returncode == 2 and "not a prepared data folder" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and not run.exists()
    (run / "best").mkdir(parents=True)
    taken = run_module("minigpt2.core.train", d, "--out", run, "--preset", "tiny", cwd=tmp_path)
    assert taken.returncode == 2 and "already holds a trained model" in taken.stderr
    assert list((run / "best").iterdir()) == []


def test_a_textbook_checkpoint_holding_more_than_tensors_is_refused(tmp_path: Path) -> None:
    d, run = prepare(tmp_path), tmp_path / "run"
    assert run_module("minigpt2.core.train", d, "--out", run, "--preset", "tiny", "--max-iters", 10,
                      cwd=tmp_path).returncode == 0  # fmt: skip
    torch.save({"transformer.wte.weight": "not a tensor"}, run / "best" / "model.pt")
    with pytest.raises(CheckpointError, match="does not hold a dict of named tensors"):
        checkpoint.load_model(run)


def textbook_reports(data_dir: Path, **overrides: object) -> list[Report]:
    """The textbook loop on its own, set up as ``python -m minigpt2.core.train`` sets it up."""
    train_data, val_data, tokenizer, _ = read_data_folder(data_dir)
    model_cfg, cfg = tiny(**overrides)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    batches = Batches(train_data, val_data, model_cfg.block_size, cfg.batch_size, cfg.grad_accum,
                      cfg.eval_iters, seed=cfg.seed)  # fmt: skip
    precision = Precision(torch.device("cpu"), "fp32", "test")
    return list(train(model, optimizer, batches, cfg, precision))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_products_trainer_takes_the_textbook_loops_steps(tmp_path: Path, optimizer: str) -> None:
    """The product's trainer on the textbook engine (dropout on, accumulation of two micro-batches,
    early stopping that ends the run) repeats the textbook loop's every loss and evaluation."""
    d = prepare(tmp_path)
    settings = dict(engine="reference", dropout=0.1, grad_accum=2, optimizer=optimizer, max_iters=40,
                    eval_interval=4, patience=2, lr=3e-2, samples=False)  # fmt: skip
    reports = textbook_reports(d, **settings)
    result = product.train(d, tmp_path / "run", *tiny(**settings))
    got = rows(tmp_path / "run")
    assert [int(r["step"]) for r in got] == [r.step for r in reports]
    for row, report in zip(got, reports, strict=True):
        assert row["train_loss"] == pytest.approx(report.loss, abs=1e-6)
        assert math.isnan(row["val_loss"]) == math.isnan(report.val_loss)
        if not math.isnan(report.val_loss):
            assert row["val_loss"] == pytest.approx(report.val_loss, abs=1e-6)
    assert result.stop_reason == reports[-1].stop
