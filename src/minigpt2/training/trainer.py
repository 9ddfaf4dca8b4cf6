"""The training loop: ``Trainer.run`` steps until ``max_iters``, the time budget, early stopping,
divergence or Ctrl-C (SIGINT/SIGTERM), evaluating every ``eval_interval`` steps.

The step itself, with the five techniques minigpt2 was founded on (mixed precision, gradient
clipping, LR schedule, LR warm-up, early stopping), is the textbook's ``core/train_step.py``; here
is what feeds and follows it: the batches (gradient accumulation, passes of ``max_pass_tokens``,
each process's slice under DDP), the LR horizon of a time budget, the decision after each
evaluation (``best`` on an improvement, early stopping), the metrics and callbacks, a graceful stop.
Building the run is ``setup.py``; its files (``best``, ``last``, exact resume) are ``checkpoints.py``.
Reports go through ``metrics.Callback``; nothing here prints. Tests: ``pytest tests/test_train.py``.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from minigpt2 import data
from minigpt2.core import train_step as core_step
from minigpt2.core.config import ModelConfig, TrainConfig
from minigpt2.core.schedule import early_stop_update
from minigpt2.fast.memory import keep_freed_memory
from minigpt2.precision import choose_device
from minigpt2.training import distributed
from minigpt2.training.checkpoints import evaluate_tokens
from minigpt2.training.metrics import Callback, MetricsFile, StepRecord
from minigpt2.training.runstate import RunLock, TrainResult
from minigpt2.training.setup import CPU_PASS_TOKENS, RunSetup, pass_size

__all__ = ["CPU_PASS_TOKENS", "Trainer", "evaluate_tokens", "pass_size", "train"]


class Trainer(RunSetup):
    """One training run into ``run_dir``. Build it, then call ``run()``."""

    def __init__(
        self,
        data_dir: Path,
        run_dir: Path,
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        *,
        resume: bool = False,
        init_from: Path | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.run_dir, self.cfg = run_dir, cfg
        device = choose_device(cfg.device)
        self.dist = distributed.init(device)
        self.device = distributed.process_device(device, self.dist)
        self.callbacks = list(callbacks) if self.dist.is_main else []
        self.lock = RunLock(run_dir) if self.dist.is_main else None
        self._stop_requested = False
        self._stop_signal: int | None = None  # the signal that asked for the stop
        try:
            self._setup(data_dir, model_cfg, resume, init_from)  # setup.RunSetup
        except BaseException:  # a run that cannot start must not keep (or leave) its directory
            if self.lock:
                self.lock.abandon()
            raise

    # -- one optimizer step: core/train_step.py on this step's batches ------------------------------

    def _micro_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``grad_accum`` micro-batches; each is this process's slice of one global batch, so N
        processes see exactly what one process with an N times larger batch would."""
        T, B, r = self.model_cfg.block_size, self.cfg.batch_size, self.dist.rank
        mask = self.masks[0] if self.masks else None
        for _ in range(self.cfg.grad_accum):
            starts = data.random_starts(len(self.train_data), self.global_batch, T, self.sampler)
            x, y = data.windows(self.train_data, starts[r * B : (r + 1) * B], T, mask)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _passes(self) -> Iterator[core_step.Pass]:
        """The step's forward/backward passes: each micro-batch cut into ``pass_size`` pieces.
        Yields (x, y, weight, last pass of the step?). A piece's weight is its share of the
        micro-batch's counted targets (all of them, or only the bot's with ``loss_on="bot"``) over
        ``grad_accum``, so the pieces' weighted mean losses add up to the micro-batch's mean loss."""
        size, accum = self.pass_size, self.cfg.grad_accum
        for i, (x, y) in enumerate(self._micro_batches()):
            # Without a loss mask every target counts: the shares are plain numbers (no tensor ops).
            counted = (y != -1).sum().clamp(min=1) if self.masks else y.numel()  # tensor: no wait
            pieces = list(zip(torch.split(x, size), torch.split(y, size), strict=True))
            for j, (xp, yp) in enumerate(pieces):
                weight = ((yp != -1).sum() if self.masks else yp.numel()) / counted / accum
                yield xp, yp, weight, i == accum - 1 and j == len(pieces) - 1

    def horizon(self) -> int:
        """The step the LR schedule decays towards: ``max_iters``, or with a time budget the steps
        expected to fit in it at the speed so far, so the LR reaches ``min_lr`` as time runs out."""
        cfg = self.cfg
        if self.step < max(10, cfg.warmup_iters):  # the first steps' speed is no guide (warming up)
            return cfg.max_iters
        return self.expected_steps()

    def expected_steps(self) -> int:
        """The steps this run will take: ``max_iters``, or fewer where the time budget ends first
        at the speed so far (what the progress bar counts towards)."""
        cfg = self.cfg
        if cfg.max_minutes <= 0 or self.elapsed <= 0:
            return cfg.max_iters
        expected = int(self.step / self.elapsed * cfg.max_minutes * 60)
        return max(self.step + 1, min(cfg.max_iters, expected))

    def train_step(self) -> core_step.StepResult:
        """One optimizer step. Returns (train loss, grad norm before clipping, clipped?, lr)."""
        return core_step.train_step(
            self.model, self.optimizer, self.scaler, self._passes(), cfg=self.cfg, step=self.step,
            horizon=self.horizon(), precision=self.precision, params=self.params, no_sync=self.no_sync,
            process_mean=self._process_mean,
        )  # fmt: skip

    def evaluate(self) -> float:
        """Mean loss over the fixed validation windows (this process's share, averaged over all)."""
        if self.model is not self.raw_model:  # a DDP wrapper has a mode of its own: the step reads it
            self.model.eval()
        return core_step.evaluate(self.raw_model, self._eval_batches(), self.precision, self._process_mean)

    def _eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        T, B, r = self.model_cfg.block_size, self.cfg.batch_size, self.dist.rank
        mask = self.masks[1] if self.masks else None
        for starts in self.eval_starts:
            x, y = data.windows(self.val_data, starts[r * B : (r + 1) * B], T, mask)
            yield x.to(self.device), y.to(self.device)

    def _process_mean(self, value: torch.Tensor) -> torch.Tensor:
        return distributed.mean(value, self.dist)

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg = self.cfg
        self._announce()
        for cb in self.callbacks:
            cb.on_start(cfg.max_iters, self.step)
        metrics = MetricsFile(self.run_dir / "metrics.csv", self.records) if self.dist.is_main else None
        reason = f"reached max_iters ({cfg.max_iters})"
        tokens_per_step = self.global_batch * cfg.grad_accum * self.model_cfg.block_size
        clock = time.perf_counter() - self.elapsed
        # With the fast engine on a CPU, freed activations stay in the process for the next step.
        fast_cpu = cfg.engine == "fast" and self.device.type == "cpu"
        memory = keep_freed_memory() if fast_cpu else contextlib.nullcontext()
        with (
            self._graceful_stop(),
            memory,
            contextlib.closing(metrics) if metrics else contextlib.nullcontext(),
        ):
            while self.step < cfg.max_iters:
                t0 = time.perf_counter()
                train_loss, grad_norm, clipped, lr = self.train_step()
                if not math.isfinite(train_loss):
                    reason = (
                        f"diverged: the training loss became {train_loss} at step {self.step + 1};"
                        f" {self._best_note()}; try a lower --lr"
                    )
                    break
                self.step += 1
                self.elapsed = time.perf_counter() - clock
                if cfg.max_minutes > 0 and self.dist.enabled:  # one clock for all: same LR horizon
                    self.elapsed = float(distributed.mean(torch.tensor(self.elapsed), self.dist))
                record = StepRecord(self.step, train_loss, math.nan, lr, grad_norm, clipped,
                                    tokens_per_step / (time.perf_counter() - t0), self.elapsed)  # fmt: skip
                out_of_time = cfg.max_minutes > 0 and self.elapsed >= cfg.max_minutes * 60
                out_of_time = distributed.any_true(out_of_time, self.device, self.dist)
                stop = distributed.any_true(self._stop_requested, self.device, self.dist)
                stop_early = False
                self.records.append(record)  # first, so that a `best` saved below reports this step
                if self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters or out_of_time:
                    record.val_loss = self.evaluate()
                    stop_early = self._after_eval(record.val_loss)
                if metrics:
                    metrics.write(record)
                total = self.expected_steps()
                for cb in self.callbacks:
                    cb.on_total(total)
                    cb.on_step(record)
                if not math.isnan(record.val_loss):
                    self._save("last")
                if stop_early:
                    reason = f"early stopping: no improvement in {cfg.patience} evaluations"
                    break
                if out_of_time:
                    reason = f"time budget of {cfg.max_minutes:g} minutes reached"
                    break
                if stop:
                    reason = "interrupted; resume with --resume"
                    self._save("last")
                    break
        result = self._finish(reason)
        # Recorded so that the command can exit as shells expect of a program a signal stopped.
        result.stop_signal = self._stop_signal if reason.startswith("interrupted") else None
        return result

    def _announce(self) -> None:
        cfg, model_cfg = self.cfg, self.model_cfg
        self._message(f"device {self.device}, precision {self.precision.name} ({self.precision.reason})")
        self._message(
            f"model: {self.raw_model.num_params():,} parameters, {model_cfg.n_layer} layers,"
            f" {model_cfg.n_head} heads, width {model_cfg.n_embd},"
            f" context {model_cfg.block_size}, vocabulary {model_cfg.vocab_size}"
        )
        if self.dist.enabled:
            self._message(f"DDP: {self.dist.world_size} processes, global batch {self.global_batch}")
        if self.pass_size < cfg.batch_size:
            passes = -(-cfg.batch_size // self.pass_size)
            self._message(f"batch {cfg.batch_size} runs as {passes} passes of up to {self.pass_size} "
                          "sequences (max_pass_tokens: less memory, same gradients)")  # fmt: skip

    def _after_eval(self, val_loss: float) -> bool:
        """Early stopping: save ``best`` on an improvement; True when patience has run out."""
        cfg = self.cfg
        self.early, improved, stop = early_stop_update(
            self.early, val_loss, self.step, min_delta=cfg.min_delta, patience=cfg.patience
        )
        if improved:
            self._save("best")
        for cb in self.callbacks:
            cb.on_eval(self.step, val_loss, improved)
        if self.samples is not None and self.samples.due(self.elapsed):
            shown = self.samples.write(self.raw_model, self.step, val_loss, self.precision)
            for cb in self.callbacks:
                cb.on_samples(shown)
        return stop and cfg.early_stopping

    @contextlib.contextmanager
    def _graceful_stop(self) -> Iterator[None]:
        """Ctrl-C or SIGTERM ends the run at the next step boundary with ``last`` saved, so a resume
        is exact; a second Ctrl-C stops at once."""

        def handler(signum: int, frame: Any) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested, self._stop_signal = True, signum
            self._message("stopping after this step (Ctrl-C again to stop now)")

        previous = {}
        with contextlib.suppress(ValueError):  # signal handlers only work in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def train(
    data_dir: Path,
    run_dir: Path,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    init_from: Path | None = None,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Train a model on a prepared data folder into ``run_dir``; see ``Trainer``."""
    trainer = Trainer(data_dir, run_dir, model_cfg, cfg, resume=resume, init_from=init_from,
                      callbacks=callbacks)  # fmt: skip
    try:
        return trainer.run()
    finally:
        if trainer.lock:
            trainer.lock.release()
