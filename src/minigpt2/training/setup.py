"""Building a training run, before its first step: ``RunSetup``, the part of the ``Trainer`` that
does it.

In order: the seed; the data and where the run starts (fresh, ``--resume``, ``--init-from``,
``runstate.load_start``); the precision; the model through ``fast.use_engine``; the optimizer and
the loop's state (the fp16 GradScaler); ``torch.compile``, tried once with a fallback to eager; the
DDP wrapper; the batches (``run_batches.RunBatches``); the training state of a resume;
``config.json``. Also ``pass_size``: how
many sequences go through one forward/backward pass. Tests: ``pytest tests/test_train.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from minigpt2 import data
from minigpt2.core.batches import random_starts, windows
from minigpt2.core.config import ModelConfig, TrainConfig
from minigpt2.core.model import GPT
from minigpt2.core.optim import make_optimizer
from minigpt2.core.schedule import EarlyStopState
from minigpt2.core.train import LoopState
from minigpt2.errors import ConfigError
from minigpt2.fast import use_engine
from minigpt2.machine import muon_dtype
from minigpt2.training import fit as fitting
from minigpt2.training.checkpoints import RunFiles
from minigpt2.training.metrics import TensorBoardCallback
from minigpt2.training.run_batches import RunBatches
from minigpt2.training.runstate import RunLock, Start, load_start
from minigpt2.training.samples import SampleWriter

log = logging.getLogger("minigpt2.training.trainer")  # the trainer's messages, wherever they are made
# Tokens per forward/backward pass on a CPU when max_pass_tokens is 0 (auto): at batch 64 x 256,
# passes of 16 sequences trained faster than one pass of 64 and peaked at 1.5 instead of 3.7-4.3 GiB.
CPU_PASS_TOKENS = 4096


def pass_size(cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device) -> int:
    """Sequences per forward/backward pass: the micro-batch, or pieces of it (``max_pass_tokens``)."""
    limit = cfg.max_pass_tokens or (CPU_PASS_TOKENS if device.type == "cpu" else 0)
    if not limit:
        return cfg.batch_size
    return max(1, min(cfg.batch_size, limit // model_cfg.block_size))


class RunSetup(RunFiles):
    """Builds everything a run needs; ``Trainer.__init__`` calls ``_setup``."""

    device: torch.device
    lock: RunLock | None
    train_data: np.ndarray
    val_data: np.ndarray
    model: nn.Module  # raw_model, compiled and/or wrapped in DDP: what the training step calls
    loop: LoopState  # the textbook loop's state: step, early stopping, the fp16 GradScaler
    batches: RunBatches
    no_sync: Callable[[], AbstractContextManager[object]] | None  # DDP's, None in one process
    samples: SampleWriter | None = None  # rank 0 with cfg.samples
    fit: fitting.Fit | None = None  # what fit_to_budget chose, for config.json

    def _setup(self, data_dir: Path, model_cfg: ModelConfig, resume: bool, init_from: Path | None) -> None:
        """The order matters: the seed comes first (the model's initialisation and the compile trial
        draw from it), the training state of a resume after them (it restores the random state)."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed + self.dist.rank)  # dropout differs per process, as it should
        start = self._load(data_dir, model_cfg, resume, init_from)
        self._build_model(start)
        cfg = self.cfg  # as fit_to_budget may have changed it
        self.batches = RunBatches(
            self.train_data, self.val_data, self.model_cfg.block_size, cfg.batch_size, cfg.grad_accum,
            cfg.eval_iters, cfg.loss_on == "bot", cfg.seed, self.device, rank=self.dist.rank,
            world_size=self.dist.world_size, pass_size=self.pass_size, no_sync=self.no_sync,
        )  # fmt: skip
        self.sampler = self.batches.generator  # same seed on every rank: one global batch
        self.elapsed = 0.0
        self.records = []
        if start.train_state is not None:
            self._restore(start.train_state)  # checkpoints.RunFiles
        if self.dist.is_main:
            if cfg.tensorboard:
                try:
                    self.callbacks.append(TensorBoardCallback(self.run_dir / "tensorboard"))
                except ImportError:
                    raise ConfigError(
                        "--tensorboard needs the tensorboard package: pip install tensorboard"
                    ) from None
            if cfg.samples:  # what the model says at each evaluation (samples.py)
                kind = self.data_meta.get("kind")
                self.samples = SampleWriter(self.run_dir, cfg, self.tokenizer, self.val_data, kind)
                self.samples.keep_until(self.step)
            self._write_config(data_dir, init_from)  # last: a run that fails to start writes nothing

    def _load(self, data_dir: Path, model_cfg: ModelConfig, resume: bool, init_from: Path | None) -> Start:
        """Where the run starts (fresh, resumed, fine-tuned): its splits, vocabulary and model
        config, checked; and the precision for that model."""
        cfg = self.cfg
        dataset = data.load(data_dir)
        start = load_start(self.run_dir, dataset, model_cfg, cfg, resume=resume, init_from=init_from)
        self.tokenizer, self.data_meta = start.tokenizer, dataset.meta
        self.data_fingerprint = data.fingerprint(dataset)  # recorded in checkpoints: resume checks it
        self.train_data, self.val_data = start.train, start.val
        self.model_cfg = start.model_cfg
        if cfg.fit_to_budget and start.weights is None:  # a fresh model: its width may still change
            self._fit_to_budget()
        self.precision = fitting.training_precision(self.model_cfg, cfg, self.device, self.pass_size)
        self._check_sizes()
        if cfg.loss_on == "bot" and dataset.meta.get("kind") != "dialogue":
            raise ConfigError(
                "--loss-on bot needs a dialogue corpus (e.g. chatterbot); this data is plain text"
            )
        return start

    def _fit_to_budget(self) -> None:
        """``fit.fit_to_budget`` on this run: its width, batch and step count fitted, the choice logged
        and kept for ``config.json``. The timing's random draws are its own: the run starts from the
        same random state as one configured with the fitted settings from the start."""
        if self.dist.enabled:  # each process would time its own steps, and might choose otherwise
            self._message("fit_to_budget: the preset's width is kept under DDP")
            return

        def seconds(model_cfg: ModelConfig) -> float:
            return fitting.time_step(
                model_cfg, self.cfg, self.device, pass_size(self.cfg, model_cfg, self.device)
            )

        with torch.random.fork_rng(devices=[]):
            self.fit = fitting.fit_to_budget(self.model_cfg, self.cfg, seconds)
        self.model_cfg, self.cfg = self.fit.apply(self.model_cfg, self.cfg)
        self._message(self.fit.note())

    def _build_model(self, start: Start) -> None:
        """The model (fresh, or the start's weights), its optimizer and scaler, compiled and wrapped."""
        self.raw_model = use_engine(GPT(self.model_cfg), self.cfg.engine)  # fast/: same results, faster
        if start.weights is not None:
            self.raw_model.load_state_dict(start.weights, strict=False)
        self.raw_model.to(self.device)
        ns_dtype = muon_dtype(self.device, self.cfg)  # Muon's, measured on a CPU
        self.optimizer = make_optimizer(self.raw_model, self.cfg, self.device, ns_dtype)
        self.loop = LoopState(torch.amp.GradScaler(self.device.type, enabled=self.precision.use_scaler))
        self.model = self._wrap(self.raw_model)

    # The loop's state, read and written by name where a run's files save and restore it.
    @property
    def step(self) -> int:
        return self.loop.step

    @step.setter
    def step(self, value: int) -> None:
        self.loop.step = value

    @property
    def early(self) -> EarlyStopState:
        return self.loop.early

    @early.setter
    def early(self, value: EarlyStopState) -> None:
        self.loop.early = value

    @property
    def scaler(self) -> torch.amp.GradScaler:
        return self.loop.scaler

    @scaler.setter
    def scaler(self, value: torch.amp.GradScaler) -> None:
        self.loop.scaler = value

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.dist.world_size

    @property
    def pass_size(self) -> int:
        return pass_size(self.cfg, self.model_cfg, self.device)

    def _check_sizes(self) -> None:
        T = self.model_cfg.block_size
        for name, split in (("train", self.train_data), ("val", self.val_data)):
            if len(split) <= T:
                raise ConfigError(
                    f"block_size {T} does not fit the {name} split ({len(split)} tokens);"
                    " use a smaller --block-size or more data"
                )
        if self.global_batch > len(self.train_data) - T:
            raise ConfigError(
                f"batch of {self.global_batch} windows is larger than the training data"
                f" ({len(self.train_data) - T} distinct windows); use a smaller --batch-size"
            )

    def _wrap(self, model: nn.Module) -> nn.Module:
        self.no_sync = None
        if self.cfg.compile:
            model = self._compiled(model)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            ddp = DistributedDataParallel(model, device_ids=ids)
            self.no_sync = ddp.no_sync
            return ddp
        return model

    def _compiled(self, model: nn.Module) -> nn.Module:
        """``torch.compile(model)``, tried once on a batch of the real shape, forward and backward
        (compilation is lazy, so that is where it fails: no C++ compiler, an unsupported platform;
        and the compile time is spent here, not in the first timed step). Compiling is an
        optimisation, so a failure falls back to eager with a warning instead of ending the run."""
        T, B = self.model_cfg.block_size, self.pass_size  # the shape every pass will have
        trial = random_starts(len(self.train_data), B, T, torch.Generator().manual_seed(0))
        x, y = windows(self.train_data, trial, T)
        try:
            compiled = torch.compile(model)
            with self.precision.autocast():
                _, loss = compiled(x.to(self.device), y.to(self.device))
            assert loss is not None
            loss.backward()
            model.zero_grad(set_to_none=True)  # the trial's gradients are not a training step
        except Exception as err:
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            self._message(f"warning: torch.compile failed ({first_line[:200]}); training eagerly")
            return model
        self._message("torch.compile: on")
        return compiled  # type: ignore[return-value]

    def _message(self, text: str) -> None:
        log.info(text)
        for cb in self.callbacks:
            cb.on_message(text)
