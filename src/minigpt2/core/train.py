"""The training loop, with the five techniques minigpt2 was founded on, and a command that runs it:

    python -m minigpt2.core.train DATA_DIR --out RUN [--preset NAME] [--max-iters N]

trains the textbook's GPT on a folder made by ``minigpt2 prepare`` and keeps its best model in
``RUN/best``, which ``minigpt2 chat RUN`` opens. The five techniques, numbered in the code:

1. mixed precision and 2. gradient clipping: inside the step (``core/train_step.py``);
3. the learning-rate schedule and 4. its warm-up: the LR of each step (``core/schedule.py``);
5. early stopping: the val loss, measured every ``eval_interval`` steps, decides when the model
   has stopped improving; the best model so far is the one kept.

``minigpt2 train`` runs this same loop, with what a product adds around it (progress bar, exact
resume, Ctrl-C, time budget, DDP, metrics and plots, the fast engine): ``training/trainer.py``.
Tests: ``pytest tests/core/test_core_train.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from minigpt2.core import config
from minigpt2.core.batches import Batches, read_data_folder
from minigpt2.core.model import GPT
from minigpt2.core.optim import make_optimizer
from minigpt2.core.precision import Precision
from minigpt2.core.schedule import EarlyStopState, early_stop_update, lr_at
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.core.train_step import evaluate, train_step
from minigpt2.errors import UserError


@dataclass
class Report:
    """What one step of the loop did."""

    step: int  # steps done so far
    loss: float  # the step's training loss
    grad_norm: float  # before clipping
    clipped: bool
    lr: float
    seconds: float  # the step's time
    val_loss: float = math.nan  # NaN: no evaluation after this step
    improved: bool = False  # a new best val loss: the caller keeps this model as the best one
    stop: str = ""  # why the loop ends after this step; "" while it goes on


@dataclass
class LoopState:
    """What the loop carries from one step to the next (a resumable trainer saves and restores it)."""

    scaler: torch.amp.GradScaler  # fp16's loss scale (disabled, x1, in bf16 and fp32)
    step: int = 0  # steps done
    early: EarlyStopState = field(default_factory=EarlyStopState)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    cfg: config.TrainConfig,
    precision: Precision,
    *,
    state: LoopState | None = None,
    step_model: nn.Module | None = None,
    lr_of: Callable[[int], float] | None = None,
    should_stop: Callable[[], str] | None = None,
    average: Callable[[Tensor], float] = float,
) -> Generator[Report, None, None]:
    """Train ``model`` until ``cfg.max_iters`` steps or early stopping, yielding a ``Report`` after
    every step: the caller prints or logs it, and keeps the model when ``report.improved`` (``model``
    itself ends with the last step's weights; the best ones are those the caller kept).

    What the product's trainer plugs in (the textbook needs none of it): ``state`` to resume from;
    ``step_model``, the model as the step calls it (compiled, or wrapped for DDP); ``lr_of``, the LR
    at a step (a time budget decays it over the steps the budget holds); ``should_stop``, asked
    after every step: a reason to end the run now, or ""; ``average``, a loss's mean over
    processes (DDP), in one process the number itself.
    """
    state = state or LoopState(torch.amp.GradScaler(precision.device.type, enabled=precision.use_scaler))
    lr_of = lr_of or functools.partial(lr_at, lr=cfg.lr, min_lr=cfg.min_lr, warmup_iters=cfg.warmup_iters,
                                       max_iters=cfg.max_iters, schedule=cfg.lr_schedule)  # fmt: skip
    params = list(model.parameters())  # once: listing them walks every module
    while state.step < cfg.max_iters:
        t0 = time.perf_counter()
        # 3. and 4.: the LR of this step, small during warm-up, then decaying along the schedule.
        lr = lr_of(state.step)
        set_lr(optimizer, lr)
        # 1. and 2.: forward and backward in mixed precision, the gradients clipped, one update.
        result = train_step(step_model or model, optimizer, state.scaler, batches.passes(), precision,
                            cfg.grad_clip, params)  # fmt: skip
        # ``state.step`` counts the steps done: the LR above is step n's (0-based), a report says n + 1.
        report = Report(state.step + 1, average(result.loss), result.grad_norm, result.clipped, lr,
                        time.perf_counter() - t0)  # fmt: skip
        if not math.isfinite(report.loss):  # diverged: the step made no update; the run ends here
            report.stop = (
                f"diverged: the training loss became {report.loss} at step {report.step}; try a lower --lr"
            )
            yield report
            return
        state.step += 1
        report.stop = should_stop() if should_stop else ""  # the caller's reason to end now, if any
        if state.step == cfg.max_iters and not report.stop:
            report.stop = f"reached max_iters ({cfg.max_iters})"
        # 5. evaluation on the same held-out windows every time; early stopping once it stops improving.
        if state.step % cfg.eval_interval == 0 or report.stop:
            # The model itself, not ``step_model``: no compiled graph or DDP wrapper is needed to score it.
            report.val_loss = average(evaluate(model, batches.val_batches(), precision))
            state.early, report.improved, patience_out = early_stop_update(
                state.early, report.val_loss, state.step, min_delta=cfg.min_delta, patience=cfg.patience
            )
            if patience_out and cfg.early_stopping:
                report.stop = f"early stopping: no improvement in {cfg.patience} evaluations"
        yield report
        if report.stop:
            return


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The LR of every param group: ``lr``, times the group's ``lr_scale`` (Muon's, core/optim.py)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def save(folder: Path, model: GPT, tokenizer: CharTokenizer, meta: dict[str, Any]) -> None:
    """The model as a checkpoint folder ``minigpt2`` opens: ``model.pt`` (the weights, read back with
    ``torch.load(..., weights_only=True)``: tensors only, never code) and ``checkpoint.json`` (how to
    rebuild the model and its vocabulary). Each file is written under a temporary name and renamed
    over the old one, so a crash leaves the previous file whole."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"format": "minigpt2-checkpoint", "version": 1, "model_config": config.to_dict(model.config),
           "tokenizer": tokenizer.to_dict(), **meta}  # fmt: skip
    weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    torch.save(weights, folder / "model.pt.tmp")
    os.replace(folder / "model.pt.tmp", folder / "model.pt")
    (folder / "checkpoint.json.tmp").write_text(
        json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8"
    )
    os.replace(folder / "checkpoint.json.tmp", folder / "checkpoint.json")


def main(argv: list[str] | None = None) -> int:
    """``python -m minigpt2.core.train DATA_DIR --out RUN``: train, printing each evaluation."""
    parser = argparse.ArgumentParser(prog="python -m minigpt2.core.train", description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", type=Path, help="a folder made by `minigpt2 prepare`")
    parser.add_argument("--out", type=Path, required=True, help="the run folder to write (RUN/best)")
    parser.add_argument("--preset", default=config.DEFAULT_PRESET, choices=list(config.PRESETS))
    parser.add_argument("--max-iters", type=int, help="optimizer steps (default: the preset's)")
    args = parser.parse_args(argv)
    try:
        if (args.out / "best").exists():
            raise UserError(f"{args.out} already holds a trained model; choose another --out")
        try:
            train_data, val_data, tokenizer, data_meta = read_data_folder(args.data_dir)
        except (OSError, ValueError, KeyError):
            raise UserError(
                f"{args.data_dir} is not a prepared data folder; run `minigpt2 prepare`"
            ) from None
        model_cfg, cfg = config.resolve(args.preset, overrides={"max_iters": args.max_iters})
        model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
        if min(len(train_data), len(val_data)) <= model_cfg.block_size:  # not one whole window
            raise UserError(f"{args.data_dir} is too small for the {args.preset} preset's windows")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # 1. mixed precision: bf16 on a CUDA GPU that has it, else fp32. Whether bf16 pays on a CPU, and
    # fp16 with its loss scaler, are `minigpt2 train --dtype`'s (hardware/precision.py measures it).
    fast_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    precision = Precision(device, "bf16" if fast_bf16 else "fp32", "the textbook's choice")
    torch.manual_seed(cfg.seed)  # the same seed, the same model, batches and dropout
    model = GPT(model_cfg).to(device)
    optimizer = make_optimizer(model, cfg, device)
    batches = Batches(train_data, val_data, model_cfg.block_size, cfg.batch_size, cfg.grad_accum,
                      cfg.eval_iters, seed=cfg.seed, device=device)  # fmt: skip
    print(f"{model.num_params():,} parameters, {precision.name} on {device}, {cfg.optimizer},"
          f" up to {cfg.max_iters} steps")  # fmt: skip
    meta: dict[str, Any] = {
        "train_config": config.to_dict(cfg),
        "data": {k: data_meta.get(k) for k in ("source", "kind")},
        "chat_template": "dialogue" if data_meta.get("kind") == "dialogue" else "play",
    }
    for report in train(model, optimizer, batches, cfg, precision):
        if not math.isnan(report.val_loss):
            saved = " (the best so far: saved)" if report.improved else ""
            print(f"step {report.step}: train loss {report.loss:.3f}, val loss {report.val_loss:.3f},"
                  f" lr {report.lr:.1e}, {report.seconds * 1000:.0f} ms a step{saved}")  # fmt: skip
        if report.improved:  # 5. the best model is the one kept
            # The checkpoint format's fields: the step and val loss of the weights, and of the best.
            meta.update(step=report.step, best_step=report.step, val_loss=report.val_loss,
                        best_val_loss=report.val_loss)  # fmt: skip
            save(args.out / "best", model, tokenizer, meta)
        if report.stop:
            print(f"stopped: {report.stop}")
    print(f"the best model is in {args.out / 'best'}; talk to it: minigpt2 chat {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
