"""Building a training run, before its first step: ``build_run`` makes the ``RunParts`` the
``Trainer`` drives the textbook's loop with.

In order: the seed; the data and where the run starts (fresh, ``--resume``, ``--init-from``,
``runstate.load_start``); the fit to the machine's time budget (``fit.py``); the precision; the
model through ``fast.use_engine``; the optimizer and the loop's state (the fp16 GradScaler);
``torch.compile``, tried once with a fallback to eager; the DDP wrapper; the batches
(``run_batches.RunBatches``). Also ``pass_size``: how many sequences go through one
forward/backward pass. Tests: ``pytest tests/training/test_train.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from minigpt2 import data
from minigpt2.core.batches import random_starts, windows
from minigpt2.core.config import ModelConfig, TrainConfig
from minigpt2.core.model import GPT
from minigpt2.core.optim import make_optimizer
from minigpt2.core.precision import Precision
from minigpt2.core.schedule import EarlyStopState
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.core.train import LoopState
from minigpt2.errors import ConfigError
from minigpt2.fast import use_engine, use_optimizer_engine
from minigpt2.hardware.machine import muon_dtype
from minigpt2.training import fit as fitting
from minigpt2.training.distributed import DistInfo
from minigpt2.training.metrics import StepRecord
from minigpt2.training.run_batches import RunBatches
from minigpt2.training.runstate import Start, load_start

# Tokens per forward/backward pass on a CPU when max_pass_tokens is 0 (auto): at batch 64 x 256,
# passes of 16 sequences trained faster than one pass of 64 and peaked at 1.5 instead of 3.7-4.3 GiB.
CPU_PASS_TOKENS = 4096


def pass_size(cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device) -> int:
    """Sequences per forward/backward pass: the micro-batch, or pieces of it (``max_pass_tokens``)."""
    limit = cfg.max_pass_tokens or (CPU_PASS_TOKENS if device.type == "cpu" else 0)
    if not limit:
        return cfg.batch_size
    return max(1, min(cfg.batch_size, limit // model_cfg.block_size))


@dataclass
class RunParts:
    """What one training run is made of, and its progress (saved in ``last``, restored on a resume)."""

    run_dir: Path
    cfg: TrainConfig  # as fit_to_budget left it
    model_cfg: ModelConfig
    dist: DistInfo
    device: torch.device
    tokenizer: CharTokenizer
    data_meta: dict[str, Any]  # the data folder's meta.json
    data_fingerprint: str  # recorded in checkpoints: a resume checks it
    train_data: np.ndarray
    val_data: np.ndarray
    precision: Precision
    raw_model: GPT
    model: nn.Module  # raw_model, compiled and/or wrapped in DDP: what the training step calls
    optimizer: torch.optim.Optimizer
    loop: LoopState  # the textbook loop's: step, early stopping, the fp16 GradScaler
    batches: RunBatches
    fit: fitting.Fit | None = None  # what fit_to_budget chose, for config.json
    elapsed: float = 0.0  # seconds of training so far
    records: list[StepRecord] = field(default_factory=list)

    @property
    def step(self) -> int:
        return self.loop.step

    @property
    def early(self) -> EarlyStopState:
        return self.loop.early

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.dist.world_size

    @property
    def pass_size(self) -> int:
        return self.batches.pass_size


def build_run(
    data_dir: Path,
    run_dir: Path,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    dist: DistInfo,
    device: torch.device,
    *,
    resume: bool,
    init_from: Path | None,
    message: Callable[[str], None],
) -> tuple[RunParts, Start]:
    """Everything a run needs, and where it starts (a resume's training state is restored by
    ``checkpoints.RunFiles``). The order matters: the seed comes first (the model's initialisation
    and the compile trial draw from it), a resume's random state after them."""
    torch.manual_seed(cfg.seed + dist.rank)  # dropout differs per process, as it should
    dataset = data.load(data_dir)
    start = load_start(run_dir, dataset, model_cfg, cfg, resume=resume, init_from=init_from)
    model_cfg, fit = start.model_cfg, None
    if cfg.fit_to_budget and start.weights is None:  # a fresh model: its width may still change
        fit = _fit_to_budget(model_cfg, cfg, device, dist, message)
        if fit is not None:
            model_cfg, cfg = fit.apply(model_cfg, cfg)
    passes = pass_size(cfg, model_cfg, device)
    precision = fitting.training_precision(model_cfg, cfg, device, passes)
    _check_sizes(model_cfg, cfg.batch_size * dist.world_size, start.train, start.val)
    if cfg.loss_on == "bot" and dataset.meta.get("kind") != "dialogue":
        raise ConfigError("--loss-on bot needs a dialogue corpus (e.g. chatterbot); this data is plain text")

    raw_model = use_engine(GPT(model_cfg), cfg.engine)  # fast/: same results, faster
    if start.weights is not None:
        raw_model.load_state_dict(start.weights, strict=False)
    raw_model.to(device)
    # Muon's dtype: measured on a CPU; the engine's Muon where it is faster (fast/muon.py)
    optimizer = use_optimizer_engine(
        make_optimizer(raw_model, cfg, device, muon_dtype(device, cfg)), cfg.engine
    )
    loop = LoopState(torch.amp.GradScaler(device.type, enabled=precision.use_scaler))
    model: nn.Module = raw_model
    if cfg.compile:
        model = _compiled(raw_model, start.train, model_cfg.block_size, passes, precision, message)
    batches = RunBatches(
        start.train, start.val, model_cfg.block_size, cfg.batch_size, cfg.grad_accum, cfg.eval_iters,
        cfg.loss_on == "bot", cfg.seed, device, rank=dist.rank, world_size=dist.world_size, pass_size=passes,
    )  # fmt: skip
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        batches.no_sync, model = ddp.no_sync, ddp
    parts = RunParts(run_dir, cfg, model_cfg, dist, device, start.tokenizer, dataset.meta,
                     data.fingerprint(dataset), start.train, start.val, precision, raw_model, model,
                     optimizer, loop, batches, fit)  # fmt: skip
    return parts, start


def _fit_to_budget(
    model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, dist: DistInfo,
    message: Callable[[str], None],
) -> fitting.Fit | None:  # fmt: skip
    """``fit.fit_to_budget`` for this run, the choice logged. The timing's random draws are its own:
    the run starts from the same random state as one configured with the fitted settings."""
    if dist.enabled:  # each process would time its own steps, and might choose otherwise
        message("fit_to_budget: the preset's width is kept under DDP")
        return None

    def seconds(candidate: ModelConfig) -> float:
        return fitting.time_step(candidate, cfg, device, pass_size(cfg, candidate, device))

    with torch.random.fork_rng(devices=[]):
        fit = fitting.fit_to_budget(model_cfg, cfg, seconds)
    message(fit.note())
    return fit


def _check_sizes(model_cfg: ModelConfig, global_batch: int, train: np.ndarray, val: np.ndarray) -> None:
    T = model_cfg.block_size
    for name, split in (("train", train), ("val", val)):
        if len(split) <= T:
            raise ConfigError(
                f"block_size {T} does not fit the {name} split ({len(split)} tokens);"
                " use a smaller --block-size or more data"
            )
    if global_batch > len(train) - T:
        raise ConfigError(
            f"batch of {global_batch} windows is larger than the training data"
            f" ({len(train) - T} distinct windows); use a smaller --batch-size"
        )


def _compiled(
    model: nn.Module, train: np.ndarray, T: int, B: int, precision: Precision, message: Callable[[str], None]
) -> nn.Module:
    """``torch.compile(model)``, tried once on a batch of the real shape (B, T), forward and backward
    (compilation is lazy, so that is where it fails: no C++ compiler, an unsupported platform; and
    the compile time is spent here, not in the first timed step). Compiling is an optimisation, so a
    failure falls back to eager with a warning instead of ending the run."""
    x, y = windows(train, random_starts(len(train), B, T, torch.Generator().manual_seed(0)), T)
    device = next(model.parameters()).device
    try:
        compiled = torch.compile(model)
        with precision.autocast():
            _, loss = compiled(x.to(device), y.to(device))
        assert loss is not None
        loss.backward()
        model.zero_grad(set_to_none=True)  # the trial's gradients are not a training step
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        message(f"warning: torch.compile failed ({first_line[:200]}); training eagerly")
        return model
    message("torch.compile: on")
    return compiled  # type: ignore[return-value]
