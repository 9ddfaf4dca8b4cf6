"""The product's trainer: the textbook's loop (``core/train.py``) with what a tool adds around it.

``Trainer.run`` drives ``core.train.train``, the same loop a learner reads, with the five
techniques minigpt2 was founded on, and plugs into it: the batches of a run (passes of
``max_pass_tokens``, each process's slice under DDP: ``run_batches.py``), the model as compiled and
wrapped for DDP, the LR horizon of a time budget, the end of that budget, and the mean of the losses
over processes. Around each step the loop reports, it keeps the metrics, calls the callbacks
(progress bar, TensorBoard), saves ``best`` on an improvement and ``last`` after each evaluation,
writes the samples, and stops at Ctrl-C or SIGTERM with ``last`` saved, so a resume is exact.
It is built by composition: ``setup.build_run`` makes the run's parts (``RunParts``), ``RunFiles``
(``checkpoints.py``) saves and restores them, and the loop is the textbook's. Reports go through
``metrics.Callback`` and ``logging``; nothing here prints.
Tests: ``pytest tests/training/test_train.py``.
"""

from __future__ import annotations

import contextlib
import logging
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
from minigpt2.errors import ConfigError
from minigpt2.fast.memory import keep_freed_memory
from minigpt2.hardware.precision import choose_device
from minigpt2.training import distributed
from minigpt2.training.metrics import Callback, MetricsFile, StepRecord, TensorBoardCallback
from minigpt2.training.run_files import RunFiles
from minigpt2.training.runstate import RunLock, TrainResult
from minigpt2.training.samples import SampleWriter
from minigpt2.training.setup import CPU_PASS_TOKENS, build_run, pass_size

__all__ = ["CPU_PASS_TOKENS", "Trainer", "pass_size", "train"]
log = logging.getLogger(__name__)


class Trainer:
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
        device = choose_device(cfg.device)
        dist = distributed.init(device)
        self.callbacks = list(callbacks) if dist.is_main else []
        self.lock = RunLock(run_dir) if dist.is_main else None
        self.samples: SampleWriter | None = None  # rank 0 with cfg.samples: what the model says now
        self._stop_requested = False
        self._stop_signal: int | None = None  # the signal that asked for the stop
        self._clock = 0.0  # perf_counter() at the run's start, less the time of the steps resumed
        try:
            self.parts, start = build_run(
                data_dir, run_dir, model_cfg, cfg, dist, distributed.process_device(device, dist),
                resume=resume, init_from=init_from, message=self._message,
            )  # fmt: skip
            self.files = RunFiles(self.parts, self._message)
            self._params = list(self.parts.raw_model.parameters())  # for train_step: listed once
            if start.train_state is not None:
                self.files.restore(start.train_state)
            if dist.is_main:
                self._main_process_extras()
                self.files.write_config(data_dir, init_from)  # last: a run that fails to start writes nothing
        except BaseException:  # a run that cannot start must not keep (or leave) its directory
            if self.lock:
                self.lock.abandon()
            raise

    def _main_process_extras(self) -> None:
        """TensorBoard and the samples file: the first process's alone."""
        p = self.parts
        if p.cfg.tensorboard:
            try:
                self.callbacks.append(TensorBoardCallback(p.run_dir / "tensorboard"))
            except ImportError:
                raise ConfigError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard"
                ) from None
        if p.cfg.samples:  # what the model says at each evaluation (samples.py)
            kind = p.data_meta.get("kind")
            self.samples = SampleWriter(p.run_dir, p.cfg, p.tokenizer, p.val_data, kind)
            self.samples.keep_until(p.step)

    # -- what the run plugs into the textbook's loop ------------------------------------------------

    def horizon(self) -> int:
        """The step the LR schedule decays towards: ``max_iters``, or with a time budget the steps
        expected to fit in it at the speed so far, so the LR reaches ``min_lr`` as time runs out."""
        if self.parts.step < max(10, self.parts.cfg.warmup_iters):  # the first steps' speed is no guide
            return self.parts.cfg.max_iters
        return self.expected_steps()

    def expected_steps(self) -> int:
        """The steps this run will take: ``max_iters``, or fewer where the time budget ends first
        at the speed so far (what the progress bar counts towards)."""
        p = self.parts
        if p.cfg.max_minutes <= 0 or p.elapsed <= 0:
            return p.cfg.max_iters
        expected = int(p.step / p.elapsed * p.cfg.max_minutes * 60)
        return max(p.step + 1, min(p.cfg.max_iters, expected))

    def _lr_of(self, step: int) -> float:
        cfg = self.parts.cfg
        return lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_iters=cfg.warmup_iters,
                     max_iters=self.horizon(), schedule=cfg.lr_schedule)  # fmt: skip

    def _out_of_time(self) -> str:
        """Asked by the loop after each step: the time so far (one clock for all processes, so they
        agree on the LR horizon), and the reason to stop when the budget is spent."""
        p = self.parts
        p.elapsed = time.perf_counter() - self._clock
        if p.cfg.max_minutes > 0 and p.dist.enabled:
            p.elapsed = float(distributed.mean(torch.tensor(p.elapsed), p.dist))
        out = p.cfg.max_minutes > 0 and p.elapsed >= p.cfg.max_minutes * 60
        out = distributed.any_true(out, p.device, p.dist)
        return f"time budget of {p.cfg.max_minutes:g} minutes reached" if out else ""

    def _average(self, value: torch.Tensor) -> float:
        return float(distributed.mean(value, self.parts.dist))

    def train_step(self) -> tuple[float, float, bool, float]:
        """One optimizer step outside the loop (tests, benchmarks): (train loss, grad norm before
        clipping, clipped?, lr)."""
        p = self.parts
        lr = self._lr_of(p.step)
        core_train.set_lr(p.optimizer, lr)
        loss, grad_norm, clipped = core_step.train_step(
            p.model, p.optimizer, p.loop.scaler, p.batches.passes(), p.precision, p.cfg.grad_clip,
            self._params,
        )  # fmt: skip
        return self._average(loss), grad_norm, clipped, lr

    def evaluate(self) -> float:
        """Mean loss over the fixed validation windows (this process's share, averaged over all)."""
        p = self.parts
        return self._average(core_step.evaluate(p.raw_model, p.batches.val_batches(), p.precision))

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        p = self.parts
        self._announce()
        for cb in self.callbacks:
            cb.on_start(p.cfg.max_iters, p.step)
        metrics = MetricsFile(p.run_dir / "metrics.csv", p.records) if p.dist.is_main else None
        reason = f"reached max_iters ({p.cfg.max_iters})"
        self._clock = time.perf_counter() - p.elapsed
        # With the fast engine on a CPU, freed activations stay in the process for the next step.
        fast_cpu = p.cfg.engine == "fast" and p.device.type == "cpu"
        memory = keep_freed_memory() if fast_cpu else contextlib.nullcontext()
        loop = core_train.train(
            p.raw_model, p.optimizer, p.batches, p.cfg, p.precision, state=p.loop, step_model=p.model,
            lr_of=self._lr_of, should_stop=self._out_of_time, average=self._average,
        )  # fmt: skip
        with (
            self._graceful_stop(),
            memory,
            contextlib.closing(loop),
            contextlib.closing(metrics) if metrics else contextlib.nullcontext(),
        ):
            for report in loop:
                if report.stop.startswith("diverged"):
                    reason = report.stop.replace("; try", f"; {self.files.best_note()}; try")
                    break
                self._after_step(report, metrics)
                if report.stop:
                    reason = report.stop
                    break
                if distributed.any_true(self._stop_requested, p.device, p.dist):
                    reason = "interrupted; resume with --resume"
                    self.files.save("last")
                    break
        result = self.files.finish(reason, self.callbacks)
        # Recorded so that the command can exit as shells expect of a program a signal stopped.
        result.stop_signal = self._stop_signal if reason.startswith("interrupted") else None
        return result

    def _after_step(self, report: core_train.Report, metrics: MetricsFile | None) -> None:
        """The record of a step, and what follows an evaluation: ``best`` on an improvement, the
        callbacks, the samples, ``last``."""
        p = self.parts
        tokens = p.global_batch * p.cfg.grad_accum * p.model_cfg.block_size
        record = StepRecord(report.step, report.loss, report.val_loss, report.lr, report.grad_norm,
                            report.clipped, tokens / report.seconds, p.elapsed)  # fmt: skip
        p.records.append(record)  # first, so that a `best` saved below reports this step
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
            self.files.save("last")

    def _after_eval(self, val_loss: float, improved: bool) -> None:
        """``best`` on an improvement (early stopping's bookkeeping is the loop's), the callbacks and
        the samples of what the model says now."""
        p = self.parts
        if improved:
            self.files.save("best")
        for cb in self.callbacks:
            cb.on_eval(p.step, val_loss, improved)
        if self.samples is not None and self.samples.due(p.elapsed):
            shown = self.samples.write(p.raw_model, p.step, val_loss, p.precision)
            for cb in self.callbacks:
                cb.on_samples(shown)

    def _announce(self) -> None:
        p, model_cfg = self.parts, self.parts.model_cfg
        self._message(f"device {p.device}, precision {p.precision.name} ({p.precision.reason})")
        self._message(
            f"model: {p.raw_model.num_params():,} parameters, {model_cfg.n_layer} layers,"
            f" {model_cfg.n_head} heads, width {model_cfg.n_embd},"
            f" context {model_cfg.block_size}, vocabulary {model_cfg.vocab_size}"
        )
        if p.dist.enabled:
            self._message(f"DDP: {p.dist.world_size} processes, global batch {p.global_batch}")
        if p.pass_size < p.cfg.batch_size:
            passes = -(-p.cfg.batch_size // p.pass_size)
            self._message(f"batch {p.cfg.batch_size} runs as {passes} passes of up to {p.pass_size} "
                          "sequences (max_pass_tokens: less memory, same gradients)")  # fmt: skip

    def _message(self, text: str) -> None:
        log.info(text)
        for cb in self.callbacks:
            cb.on_message(text)

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
