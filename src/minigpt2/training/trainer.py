"""The product's trainer: the textbook's loop (``core/train.py``) with what a tool adds around it.

``Trainer.run`` drives ``core.train.train``, the same loop a learner reads, with the five
techniques minigpt2 was founded on, and plugs into it: the batches of a run (passes of
``max_pass_tokens``, each process's slice under DDP: ``run_batches.py``), the model as compiled and
wrapped for DDP, the LR horizon of a time budget, the end of that budget, and the mean of the losses
over processes. Around each step the loop reports, it keeps the metrics, calls the callbacks
(progress bar, TensorBoard), saves ``best`` on an improvement and ``last`` after each evaluation,
writes the samples, and stops at Ctrl-C or SIGTERM with ``last`` saved, so a resume is exact.
Building the run is ``setup.py``; its files (``best``, ``last``, exact resume) are
``checkpoints.py``. Reports go through ``metrics.Callback``; nothing here prints.
Tests: ``pytest tests/test_train.py``.
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

from minigpt2.core import train as core_train
from minigpt2.core import train_step as core_step
from minigpt2.core.config import ModelConfig, TrainConfig
from minigpt2.core.schedule import lr_at
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
        self._clock = 0.0  # perf_counter() at the run's start, less the time of the steps resumed
        try:
            self._setup(data_dir, model_cfg, resume, init_from)  # setup.RunSetup
        except BaseException:  # a run that cannot start must not keep (or leave) its directory
            if self.lock:
                self.lock.abandon()
            raise

    # -- what the run plugs into the textbook's loop ------------------------------------------------

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

    def _lr_of(self, step: int) -> float:
        cfg = self.cfg
        return lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_iters=cfg.warmup_iters,
                     max_iters=self.horizon(), schedule=cfg.lr_schedule)  # fmt: skip

    def _out_of_time(self) -> str:
        """Asked by the loop after each step: the time so far (one clock for all processes, so they
        agree on the LR horizon), and the reason to stop when the budget is spent."""
        cfg = self.cfg
        self.elapsed = time.perf_counter() - self._clock
        if cfg.max_minutes > 0 and self.dist.enabled:
            self.elapsed = float(distributed.mean(torch.tensor(self.elapsed), self.dist))
        out = cfg.max_minutes > 0 and self.elapsed >= cfg.max_minutes * 60
        out = distributed.any_true(out, self.device, self.dist)
        return f"time budget of {cfg.max_minutes:g} minutes reached" if out else ""

    def _average(self, value: torch.Tensor) -> float:
        return float(distributed.mean(value, self.dist))

    def train_step(self) -> tuple[float, float, bool, float]:
        """One optimizer step outside the loop (tests, benchmarks): (train loss, grad norm before
        clipping, clipped?, lr)."""
        lr = self._lr_of(self.step)
        core_train.set_lr(self.optimizer, lr)
        loss, grad_norm, clipped = core_step.train_step(
            self.model, self.optimizer, self.scaler, self.batches.passes(), self.precision,
            self.cfg.grad_clip, list(self.raw_model.parameters()),
        )  # fmt: skip
        return self._average(loss), grad_norm, clipped, lr

    def evaluate(self) -> float:
        """Mean loss over the fixed validation windows (this process's share, averaged over all)."""
        return self._average(core_step.evaluate(self.raw_model, self.batches.val_batches(), self.precision))

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg = self.cfg
        self._announce()
        for cb in self.callbacks:
            cb.on_start(cfg.max_iters, self.step)
        metrics = MetricsFile(self.run_dir / "metrics.csv", self.records) if self.dist.is_main else None
        reason = f"reached max_iters ({cfg.max_iters})"
        self._clock = time.perf_counter() - self.elapsed
        # With the fast engine on a CPU, freed activations stay in the process for the next step.
        fast_cpu = cfg.engine == "fast" and self.device.type == "cpu"
        memory = keep_freed_memory() if fast_cpu else contextlib.nullcontext()
        loop = core_train.train(
            self.raw_model, self.optimizer, self.batches, cfg, self.precision, state=self.loop,
            step_model=self.model, lr_of=self._lr_of, should_stop=self._out_of_time, average=self._average,
        )  # fmt: skip
        with (
            self._graceful_stop(),
            memory,
            contextlib.closing(loop),
            contextlib.closing(metrics) if metrics else contextlib.nullcontext(),
        ):
            for report in loop:
                if report.stop.startswith("diverged"):
                    reason = report.stop.replace("; try", f"; {self._best_note()}; try")
                    break
                self._after_step(report, metrics)
                if report.stop:
                    reason = report.stop
                    break
                if distributed.any_true(self._stop_requested, self.device, self.dist):
                    reason = "interrupted; resume with --resume"
                    self._save("last")
                    break
        result = self._finish(reason)
        # Recorded so that the command can exit as shells expect of a program a signal stopped.
        result.stop_signal = self._stop_signal if reason.startswith("interrupted") else None
        return result

    def _after_step(self, report: core_train.Report, metrics: MetricsFile | None) -> None:
        """The record of a step, and what follows an evaluation: ``best`` on an improvement, the
        callbacks, the samples, ``last``."""
        tokens = self.global_batch * self.cfg.grad_accum * self.model_cfg.block_size
        record = StepRecord(report.step, report.loss, report.val_loss, report.lr, report.grad_norm,
                            report.clipped, tokens / report.seconds, self.elapsed)  # fmt: skip
        self.records.append(record)  # first, so that a `best` saved below reports this step
        evaluated = not math.isnan(report.val_loss)
        if evaluated:
            self._after_eval(report.val_loss, report.improved)
        if metrics:
            metrics.write(record)
        total = self.expected_steps()
        for cb in self.callbacks:
            cb.on_total(total)
            cb.on_step(record)
        if evaluated:
            self._save("last")

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

    def _after_eval(self, val_loss: float, improved: bool) -> None:
        """``best`` on an improvement (early stopping's bookkeeping is the loop's), the callbacks and
        the samples of what the model says now."""
        if improved:
            self._save("best")
        for cb in self.callbacks:
            cb.on_eval(self.step, val_loss, improved)
        if self.samples is not None and self.samples.due(self.elapsed):
            shown = self.samples.write(self.raw_model, self.step, val_loss, self.precision)
            for cb in self.callbacks:
                cb.on_samples(shown)

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
