"""One training step and one evaluation: where three of the five techniques happen.

1. Mixed precision (``train_step``): the forward pass runs under ``torch.autocast``
   (``precision.autocast()``: bf16, or fp16 with a ``GradScaler`` that scales the loss up so that
   small fp16 gradients do not underflow; see ``core/precision.py``).
2. Gradient clipping (``train_step``): the global norm of all gradients is measured (after
   unscaling) and, above ``grad_clip``, every gradient is scaled down so the norm is ``grad_clip``:
   one unlucky batch cannot throw the weights far. The norm is returned, so it can be logged.
5. Early stopping begins with ``evaluate``: the loss on held-out text, which the loop
   (``core/train.py``) watches. The learning rate of the step (3. schedule, 4. warm-up) is set by
   the loop before it calls ``train_step``.
Tests: ``pytest tests/core/test_core_train.py tests/training/test_train.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from minigpt2.core.batches import Pass
from minigpt2.core.precision import Precision


class StepResult(NamedTuple):
    loss: Tensor  # () the step's mean training loss, on the device (reading it waits for the GPU)
    grad_norm: float  # global gradient norm before clipping (NaN when the loss was not finite)
    clipped: bool


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    passes: Iterable[Pass],
    precision: Precision,
    grad_clip: float,
    params: Sequence[nn.Parameter],
) -> StepResult:
    """One optimizer step over ``passes`` (x (B, T), y (B, T), weight), whose gradients add up.

    ``params``: the model's parameters, listed once by the caller (listing walks every module).
    ``grad_clip``: the largest gradient norm let through; 0 turns clipping off.
    """
    # The step's loss, added up on the device: no float() per pass, which would make the CPU wait
    # for the GPU each time.
    total = torch.zeros((), device=params[0].device)
    for x, y, weight in passes:
        with precision.autocast():  # 1. mixed precision: bf16/fp16 matmuls, fp32 weights
            _, loss = model(x, y)  # loss: () mean over the pass's counted targets
        assert loss is not None
        # Each pass's mean loss, weighted by its share of the step: the gradients add up to those
        # of the mean over the whole batch. With fp16 the scaler multiplies the loss up, so that
        # small gradients do not underflow to zero; otherwise it is x1.
        scaler.scale(loss * weight).backward()
        total += loss.detach() * weight
    if not math.isfinite(float(total)):  # diverged: no update from this step (the loop stops)
        optimizer.zero_grad(set_to_none=True)
        return StepResult(total, math.nan, False)

    # 2. gradient clipping, on the true gradients: unscaled first if fp16 scaled them.
    scaler.unscale_(optimizer)
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    scaler.step(optimizer)  # skipped by the scaler if fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    # An infinite norm means fp16 overflow: the scaler skips this update, nothing was clipped.
    return StepResult(total, grad_norm, math.isfinite(grad_norm) and grad_norm > max_norm)


@torch.no_grad()  # no backward pass follows: keep no activations for one
def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], precision: Precision) -> Tensor:
    """() mean loss over ``batches`` of (x (B, T), y (B, T)), with dropout off; the model is left
    in training mode.

    The loop passes the same validation windows every time, so the numbers compare and early
    stopping reacts to the model, not to sampling noise.
    """
    model.eval()  # dropout off: the model as it will be used
    try:
        losses = []
        for x, y in batches:
            with precision.autocast():
                _, loss = model(x, y)  # loss: () mean over the batch's counted targets
            assert loss is not None
            losses.append(loss.float())
        return torch.stack(losses).mean()
    finally:
        model.train()
