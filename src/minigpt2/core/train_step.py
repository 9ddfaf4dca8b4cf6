"""The training step and the evaluation: where the five techniques minigpt2 was founded on live
(the numbers below mark them in the code).

1. Mixed precision (``train_step``): the forward pass runs under ``torch.autocast``
   (``precision.autocast()``: bf16, or fp16 with a ``GradScaler`` that scales the loss up so that
   small fp16 gradients do not underflow).
2. Gradient clipping (``train_step``): the global norm of all gradients is measured (after
   unscaling), clipped to ``grad_clip`` and returned, so the trainer logs it every step.
3. The learning-rate schedule and 4. its warm-up (``train_step``, first): ``schedule.lr_at``.
5. Early stopping: ``evaluate`` scores the same validation windows every ``eval_interval`` steps;
   the decision is the trainer's ``_after_eval`` (``training/trainer.py``), which folds that loss
   into ``schedule.early_stop_update``, saves ``RUN/best`` on an improvement and stops the run after
   ``patience`` evaluations without one.

The trainer (``training/``) feeds these functions: it samples the batches, runs processes under DDP,
owns devices and files, and loops. Tests: ``pytest tests/test_train.py tests/test_optim.py``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from minigpt2.core.config import TrainConfig
from minigpt2.core.model import GPT
from minigpt2.core.precision import Precision
from minigpt2.core.schedule import lr_at

# One forward/backward pass: x (B, T) ids, y (B, T) next ids (-1: not counted), the weight of its
# mean loss in the step's loss, and whether it is the step's last pass.
Pass = tuple[Tensor, Tensor, Tensor | float, bool]


class StepResult(NamedTuple):
    loss: float  # the step's mean training loss
    grad_norm: float  # global gradient norm before clipping (NaN when the loss was not finite)
    clipped: bool
    lr: float


def _itself(value: Tensor) -> Tensor:
    """The mean over one process: the value itself."""
    return value


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    passes: Iterable[Pass],
    *,
    cfg: TrainConfig,
    step: int,
    horizon: int,
    precision: Precision,
    params: Sequence[nn.Parameter],
    no_sync: Callable[[], contextlib.AbstractContextManager[object]] | None = None,
    process_mean: Callable[[Tensor], Tensor] = _itself,
) -> StepResult:
    """One optimizer step (number ``step``, 0-based) over ``passes``, whose gradients add up.

    ``horizon``: the step the LR decays towards (``cfg.max_iters``, or fewer under a time budget).
    ``params``: the model's parameters, listed once by the caller (listing walks every module).
    Under DDP, ``no_sync`` is the wrapper's ``no_sync`` and ``process_mean`` averages over processes.
    """
    # 3. and 4.: the LR of this step, warm-up included.
    lr = lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_iters=cfg.warmup_iters,
               max_iters=horizon, schedule=cfg.lr_schedule)  # fmt: skip
    for group in optimizer.param_groups:  # Muon's groups scale it (optim.make_optimizer)
        group["lr"] = lr * group.get("lr_scale", 1.0)
    if not model.training:  # after an evaluation: dropout on again (only then: train() walks
        model.train()  # every module, ~0.1 ms, and a tiny model's whole step is a few ms)

    # The step's loss, added up on the device: no float() per pass, which would make the CPU wait
    # for the GPU each time.
    total = torch.zeros((), device=params[0].device)
    for x, y, weight, last in passes:  # x, y: (B, T)
        # DDP averages gradients across processes once, on the last pass.
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync:
            with precision.autocast():  # 1. mixed precision: bf16/fp16 matmuls, fp32 weights
                _, loss = model(x, y)  # loss: () mean over the pass's counted targets
            assert loss is not None
            # Each pass's mean loss, weighted by its share of the counted targets: the gradients
            # add up to those of the mean over the whole batch. With fp16 the scaler multiplies
            # the loss up, so that small gradients do not underflow to zero; otherwise it is x1.
            scaler.scale(loss * weight).backward()
        total += loss.detach() * weight
    train_loss = float(process_mean(total))
    if not math.isfinite(train_loss):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(train_loss, math.nan, False, lr)

    # 2. gradient clipping, on the true gradients: unscaled first if fp16 scaled them.
    scaler.unscale_(optimizer)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    scaler.step(optimizer)  # skipped by the scaler if fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    # An infinite norm means fp16 overflow: the scaler skips this update, nothing was clipped.
    return StepResult(train_loss, grad_norm, math.isfinite(grad_norm) and grad_norm > max_norm, lr)


@torch.no_grad()  # no backward pass follows: keep no activations for one
def evaluate(
    model: GPT,
    batches: Iterable[tuple[Tensor, Tensor]],
    precision: Precision,
    process_mean: Callable[[Tensor], Tensor] = _itself,
) -> float:
    """Mean loss over ``batches`` of (x (B, T), y (B, T)), with dropout off (``model.eval()``).

    The trainer passes the same validation windows every time, so the numbers compare and early
    stopping reacts to the model, not to sampling noise.
    """
    model.eval()
    total, count = torch.zeros((), device=model.device), 0
    for x, y in batches:
        with precision.autocast():
            _, loss = model(x, y)  # loss: () mean over the batch's counted targets
        assert loss is not None
        total += loss
        count += 1
    return float(process_mean(total / count))
