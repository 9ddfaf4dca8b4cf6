"""Fitting a preset to this machine and its time budget: width, batch and steps that fill it best.

A preset was tuned where its step takes a known time: its ``max_iters`` are about the steps its
budget buys there (the ``chat`` preset's 8 minutes: 1,400-1,900 of its 2,500 on a CPU with bf16
units, still learning when they end). On a CPU where fp32 is the fastest PyTorch computes (AVX2
laptops: bf16 is emulated there) the same step takes three times as long, and the budget ends a
third of the way into learning. Quality at a budget is a race between the model's size and the
steps it gets, so ``fit_to_budget`` times one real training step (the run's batch, context, depth,
optimizer, engine, and the precision ``--dtype`` resolves to for that shape) of the preset's width
and then of narrower ones (``LADDER``), widest first, and keeps the widest whose steps in the budget
reach ``MIN_STEP_SHARE`` of the preset's ``max_iters`` (the narrowest if none does). A model it
narrows also trains at half the batch (on a machine that slow, more and smaller steps learn more in
the same minutes) and without dropout: dropout keeps a model from memorising its corpus over many
steps, and a model narrowed to a slow machine's minutes gets too few to memorise, so dropout only
slows its learning. ``max_iters`` becomes at least ``HEADROOM`` times the steps expected, so the
budget, not a step count chosen for another machine, ends the run. Depth, heads, context and the
LR schedule's shape stay the preset's (the schedule decays over the steps that fit the budget).

On a machine as fast as the tuning one nothing changes (the preset's own width already gets its
steps). The measurements behind the rule, on an AVX2 CPU and the classes of machine it was checked
on: docs/performance.md, section 3.
Run by the trainer when ``TrainConfig.fit_to_budget`` is on (``make chat``, ``quickstart``, the
notebook, ``train --max-minutes M`` without a preset). Tests: ``pytest tests/training/test_fit.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from minigpt2.core import train_step as core_step
from minigpt2.core.config import ModelConfig, TrainConfig
from minigpt2.core.model import GPT
from minigpt2.core.optim import make_optimizer
from minigpt2.fast import use_engine, use_optimizer_engine
from minigpt2.hardware.machine import fastest_time, muon_dtype
from minigpt2.hardware.precision import Precision, choose_precision

# The settings a fit chooses: one given explicitly is the user's choice, and no fit is made.
FITTED = frozenset({"n_embd", "batch_size", "dropout", "max_iters", "fit_to_budget"})
MIN_STEP_SHARE = 0.5  # a width must fit this share of the preset's max_iters into the budget
HEADROOM = 2  # max_iters becomes at least this many times the steps the budget is expected to hold
LADDER = (512, 384, 320, 256, 192, 128, 96, 64, 48, 32, 16)  # the widths tried below a preset's own
TRAINING_SHARE = 0.95  # the share of a budget the evaluations and samples leave to training steps


@dataclass(frozen=True)
class Fit:
    """What ``fit_to_budget`` chose, and the timings it chose from (for ``config.json`` and the log)."""

    n_embd: int
    batch_size: int
    dropout: float
    max_iters: int
    preset: tuple[int, int, float, int]  # the preset's (n_embd, batch_size, dropout, max_iters)
    step_seconds: dict[int, float]  # width -> seconds per optimizer step at the preset's batch
    budget_s: float

    def steps(self, width: int) -> int:
        """Steps of ``width`` at the preset's batch that fit the budget."""
        return int(self.budget_s * TRAINING_SHARE / self.step_seconds[width])

    def note(self) -> str:
        """One line for the log: the choice and why."""
        width, batch, dropout, iters = self.preset
        timed = ", ".join(f"width {w}: {s:.2f} s a step, ~{self.steps(w):,} steps"
                          for w, s in self.step_seconds.items())  # fmt: skip
        if self.n_embd == width:
            choice = f"keeps width {width}, batch {batch} and dropout {dropout:g}"
        else:
            choice = (f"narrows width {width} to {self.n_embd}, batch {batch} to {self.batch_size},"
                      f" dropout {dropout:g} to {self.dropout:g}")  # fmt: skip
        need = math.ceil(MIN_STEP_SHARE * iters)
        return (f"fit to {self.budget_s / 60:g} minutes on this machine: {choice}, up to"
                f" {self.max_iters:,} steps (a width needs {need:,} steps at batch {batch};"
                f" {timed})")  # fmt: skip

    def to_dict(self) -> dict[str, object]:
        width, batch, dropout, iters = self.preset
        return {"n_embd": self.n_embd, "batch_size": self.batch_size, "dropout": self.dropout,
                "max_iters": self.max_iters,
                "preset": {"n_embd": width, "batch_size": batch, "dropout": dropout, "max_iters": iters},
                "budget_s": self.budget_s, "step_seconds": {str(w): s for w, s in self.step_seconds.items()},
                "note": self.note()}  # fmt: skip

    def apply(self, model_cfg: ModelConfig, cfg: TrainConfig) -> tuple[ModelConfig, TrainConfig]:
        """The run's configs with this fit's width, batch and step count."""
        return (dataclasses.replace(model_cfg, n_embd=self.n_embd, dropout=self.dropout),
                dataclasses.replace(cfg, batch_size=self.batch_size, max_iters=self.max_iters))  # fmt: skip


def widths(model_cfg: ModelConfig) -> list[int]:
    """The preset's width, then each narrower width of ``LADDER`` that its heads divide into heads of
    at least 16."""
    narrower = [w for w in LADDER if w < model_cfg.n_embd and w % model_cfg.n_head == 0]
    return [model_cfg.n_embd, *(w for w in narrower if w // model_cfg.n_head >= 16)]


def fit_to_budget(
    model_cfg: ModelConfig, cfg: TrainConfig, step_seconds: Callable[[ModelConfig], float]
) -> Fit:
    """The widest of ``widths(model_cfg)`` whose step, timed by ``step_seconds`` at the preset's
    batch, fits ``MIN_STEP_SHARE`` of ``cfg.max_iters`` into ``cfg.max_minutes`` (the narrowest if
    none does); half the batch and no dropout if narrowed; ``max_iters`` with ``HEADROOM``."""
    budget = cfg.max_minutes * 60
    need = math.ceil(MIN_STEP_SHARE * cfg.max_iters)
    timed: dict[int, float] = {}
    for width in widths(model_cfg):
        timed[width] = step_seconds(dataclasses.replace(model_cfg, n_embd=width))
        if budget * TRAINING_SHARE / timed[width] >= need:
            break
    narrowed = width < model_cfg.n_embd
    batch = max(1, cfg.batch_size // 2) if narrowed else cfg.batch_size
    dropout = 0.0 if narrowed else model_cfg.dropout
    # A step's time follows its tokens: half the batch, about twice the steps.
    expected = budget * TRAINING_SHARE / timed[width] * cfg.batch_size / batch
    max_iters = max(cfg.max_iters, math.ceil(HEADROOM * expected))
    preset = (model_cfg.n_embd, cfg.batch_size, model_cfg.dropout, cfg.max_iters)
    return Fit(width, batch, dropout, max_iters, preset, timed, budget)


def time_step(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, pass_seqs: int) -> float:
    """Seconds one optimizer step of a fresh ``model_cfg`` model takes here: the fastest of two,
    after one untimed step, on random ids of the run's batch in passes of ``pass_seqs`` sequences,
    in the precision ``cfg.dtype`` resolves to for this shape."""
    precision = training_precision(model_cfg, cfg, device, pass_seqs)
    model = use_engine(GPT(model_cfg), cfg.engine).to(device)
    params = list(model.parameters())
    optimizer = use_optimizer_engine(make_optimizer(model, cfg, device, muon_dtype(device, cfg)), cfg.engine)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    generator = torch.Generator().manual_seed(0)
    shape = (cfg.batch_size, model_cfg.block_size)
    x = torch.randint(model_cfg.vocab_size, shape, generator=generator).to(device)
    y = torch.randint(model_cfg.vocab_size, shape, generator=generator).to(device)
    pieces = list(zip(torch.split(x, pass_seqs), torch.split(y, pass_seqs), strict=True))
    passes = [(xp, yp, xp.size(0) / cfg.batch_size) for xp, yp in pieces]

    def step() -> None:
        core_step.train_step(model, optimizer, scaler, passes, precision, cfg.grad_clip, params)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return fastest_time(step, repeats=2)


def training_precision(
    model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, pass_seqs: int
) -> Precision:
    """The precision a run of this shape trains in (``--dtype`` resolved for its passes)."""
    tokens, width = pass_seqs * model_cfg.block_size, model_cfg.n_embd
    return choose_precision(device, cfg.dtype, work=tokens * width**2, shape=(tokens, width))
