"""The training loop, with the five techniques minigpt2 was founded on, each visible in ``step``:

1. mixed precision: the forward pass runs under ``torch.autocast`` (bf16, or fp16 with a GradScaler);
2. gradient clipping: the global norm is measured (after unscaling), clipped, and logged every step;
3. a learning-rate schedule and 4. warm-up: ``schedule.lr_at`` sets the LR before every step;
5. early stopping: every ``eval_interval`` steps the same validation batches are scored; ``RUN/best``
   is written only on an improvement, and training stops after ``patience`` evaluations without one.

Around them: AdamW or Muon (``optim.py``), exact resume from ``RUN/last`` (optimizer, scaler, RNG,
sampler, counters, metrics), fine-tuning with ``init_from``, gradient accumulation, DDP under
torchrun, and ``torch.compile``.
Reports go through ``metrics.Callback``; nothing here prints. Tests: ``pytest tests/test_train.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from minigpt2 import checkpoint, data
from minigpt2.core.config import ModelConfig, TrainConfig, to_dict
from minigpt2.core.model import GPT
from minigpt2.core.schedule import EarlyStopState, early_stop_update, lr_at
from minigpt2.errors import ConfigError
from minigpt2.fast import use_engine
from minigpt2.fast.memory import keep_freed_memory
from minigpt2.fileio import atomic_write_bytes, atomic_write_text
from minigpt2.precision import choose_device, choose_precision
from minigpt2.training import distributed
from minigpt2.training.metrics import (
    Callback,
    MetricsFile,
    StepRecord,
    TensorBoardCallback,
    plot_losses,
    png_bytes,
)
from minigpt2.training.optim import make_optimizer
from minigpt2.training.runstate import RunLock, TrainResult, load_start, restore_rng, rng_state

log = logging.getLogger(__name__)
# Tokens per forward/backward pass on a CPU when max_pass_tokens is 0 (auto): at batch 64 x 256,
# passes of 16 sequences trained faster than one pass of 64 and peaked at 1.5 instead of 3.7-4.3 GiB.
CPU_PASS_TOKENS = 4096


def pass_size(cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device) -> int:
    """Sequences per forward/backward pass: the micro-batch, or pieces of it (``max_pass_tokens``)."""
    limit = cfg.max_pass_tokens or (CPU_PASS_TOKENS if device.type == "cpu" else 0)
    if not limit:
        return cfg.batch_size
    return max(1, min(cfg.batch_size, limit // model_cfg.block_size))


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
        self.run_dir, self.cfg = run_dir, cfg
        device = choose_device(cfg.device)
        self.dist = distributed.init(device)
        self.device = distributed.process_device(device, self.dist)
        self.callbacks = list(callbacks) if self.dist.is_main else []
        self.lock = RunLock(run_dir) if self.dist.is_main else None
        try:
            self._setup(data_dir, model_cfg, resume, init_from)
        except BaseException:  # a run that cannot start must not keep (or leave) its directory
            if self.lock:
                self.lock.abandon()
            raise

    def _setup(self, data_dir: Path, model_cfg: ModelConfig, resume: bool, init_from: Path | None) -> None:
        cfg, run_dir = self.cfg, self.run_dir
        torch.manual_seed(cfg.seed + self.dist.rank)  # dropout differs per process, as it should

        dataset = data.load(data_dir)
        start = load_start(run_dir, dataset, model_cfg, cfg, resume=resume, init_from=init_from)
        self.tokenizer, self.data_meta = start.tokenizer, dataset.meta
        self.train_data, self.val_data = start.train, start.val
        self.model_cfg = start.model_cfg
        work = self.pass_size * self.model_cfg.block_size * self.model_cfg.n_embd**2
        self.precision = choose_precision(self.device, cfg.dtype, work=work)
        self._check_sizes()
        if cfg.loss_on == "bot" and dataset.meta.get("kind") != "dialogue":
            raise ConfigError(
                "--loss-on bot needs a dialogue corpus (e.g. chatterbot); this data is plain text"
            )
        self.masks = (
            (data.bot_mask(self.train_data), data.bot_mask(self.val_data)) if cfg.loss_on == "bot" else None
        )

        self.raw_model = use_engine(GPT(self.model_cfg), cfg.engine)  # fast/: same results, faster
        if start.weights is not None:
            self.raw_model.load_state_dict(start.weights, strict=False)
        self.raw_model.to(self.device)
        self.params = list(self.raw_model.parameters())  # once: listing them walks every module
        self.optimizer = make_optimizer(self.raw_model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.use_scaler)
        self.model = self._wrap(self.raw_model)

        self.sampler = torch.Generator().manual_seed(cfg.seed)  # same on every rank: one global batch
        self.step, self.elapsed = 0, 0.0
        self.records: list[StepRecord] = []
        self.early = EarlyStopState()
        if start.train_state is not None:
            self._restore(start.train_state)
        # Fixed validation windows, (eval_iters, global batch): the same batches at every evaluation,
        # so the numbers compare and early stopping reacts to the model, not to sampling noise.
        eval_gen = torch.Generator().manual_seed(cfg.seed + 1)
        T = self.model_cfg.block_size
        self.eval_starts = np.stack(
            [
                data.random_starts(len(self.val_data), self.global_batch, T, eval_gen)
                for _ in range(cfg.eval_iters)
            ]
        )
        self._stop_requested = False
        if self.dist.is_main:
            if cfg.tensorboard:
                try:
                    self.callbacks.append(TensorBoardCallback(run_dir / "tensorboard"))
                except ImportError:
                    raise ConfigError(
                        "--tensorboard needs the tensorboard package: pip install tensorboard"
                    ) from None
            self._write_config(data_dir, init_from)  # last: a run that fails to start writes nothing

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
        if self.cfg.compile:
            model = self._compiled(model)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        return model

    def _compiled(self, model: nn.Module) -> nn.Module:
        """``torch.compile(model)``, tried once on a batch of the real shape, forward and backward
        (compilation is lazy, so that is where it fails: no C++ compiler, an unsupported platform;
        and the compile time is spent here, not in the first timed step). Compiling is an
        optimisation, so a failure falls back to eager with a warning instead of ending the run."""
        T, B = self.model_cfg.block_size, self.pass_size  # the shape every pass will have
        trial = data.random_starts(len(self.train_data), B, T, torch.Generator().manual_seed(0))
        x, y = data.windows(self.train_data, trial, T)
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

    # -- one optimizer step: the five techniques --------------------------------------------------

    def _micro_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``grad_accum`` micro-batches; each is this process's slice of one global batch, so N
        processes see exactly what one process with an N times larger batch would."""
        T, B, r = self.model_cfg.block_size, self.cfg.batch_size, self.dist.rank
        mask = self.masks[0] if self.masks else None
        for _ in range(self.cfg.grad_accum):
            starts = data.random_starts(len(self.train_data), self.global_batch, T, self.sampler)
            x, y = data.windows(self.train_data, starts[r * B : (r + 1) * B], T, mask)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _passes(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | float, bool]]:
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
        if cfg.max_minutes <= 0 or self.step < max(10, cfg.warmup_iters) or self.elapsed <= 0:
            return cfg.max_iters
        expected = int(self.step / self.elapsed * cfg.max_minutes * 60)
        return max(self.step + 1, min(cfg.max_iters, expected))

    def train_step(self) -> tuple[float, float, bool, float]:
        """One optimizer step. Returns (train loss, grad norm before clipping, clipped?, lr)."""
        cfg = self.cfg
        lr = lr_at(self.step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_iters=cfg.warmup_iters,
                   max_iters=self.horizon(), schedule=cfg.lr_schedule)  # fmt: skip
        for group in self.optimizer.param_groups:  # Muon's groups scale it (optim.make_optimizer)
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if not self.raw_model.training:  # only after an evaluation: walking all modules costs
            self.model.train()  # ~0.1 ms, and a tiny model's whole step is a few ms
        total = torch.zeros((), device=self.device)
        for x, y, weight, last in self._passes():
            # DDP averages gradients across processes once, on the last pass.
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.model.no_sync()  # type: ignore[operator]
            with sync:
                with self.precision.autocast():
                    _, loss = self.model(x, y)
                assert loss is not None
                # Each pass's mean loss, weighted by its share of the counted targets: the
                # gradients add up to those of the mean over the whole micro-batch.
                self.scaler.scale(loss * weight).backward()
            total += loss.detach() * weight
        train_loss = float(distributed.mean(total, self.dist))
        if not math.isfinite(train_loss):
            self.optimizer.zero_grad(set_to_none=True)
            return train_loss, math.nan, False, lr
        self.scaler.unscale_(self.optimizer)  # clip true gradients, not fp16-scaled ones
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        self.scaler.step(self.optimizer)  # skipped by the scaler if fp16 gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # An infinite norm means fp16 overflow: the scaler skips this update, nothing was clipped.
        return train_loss, grad_norm, math.isfinite(grad_norm) and grad_norm > max_norm, lr

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation windows (this process's share, averaged over all)."""
        self.model.eval()
        T, B, r = self.model_cfg.block_size, self.cfg.batch_size, self.dist.rank
        mask = self.masks[1] if self.masks else None
        total = torch.zeros((), device=self.device)
        for starts in self.eval_starts:
            x, y = data.windows(self.val_data, starts[r * B : (r + 1) * B], T, mask)
            with self.precision.autocast():
                _, loss = self.raw_model(x.to(self.device), y.to(self.device))
            assert loss is not None
            total += loss
        return float(distributed.mean(total / len(self.eval_starts), self.dist))

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg = self.cfg
        self._message(f"device {self.device}, precision {self.precision.name} ({self.precision.reason})")
        self._message(
            f"model: {self.raw_model.num_params():,} parameters, {self.model_cfg.n_layer} layers,"
            f" {self.model_cfg.n_head} heads, width {self.model_cfg.n_embd},"
            f" context {self.model_cfg.block_size}, vocabulary {self.model_cfg.vocab_size}"
        )
        if self.dist.enabled:
            self._message(f"DDP: {self.dist.world_size} processes, global batch {self.global_batch}")
        if self.pass_size < cfg.batch_size:
            passes = -(-cfg.batch_size // self.pass_size)
            self._message(f"batch {cfg.batch_size} runs as {passes} passes of up to {self.pass_size} "
                          "sequences (max_pass_tokens: less memory, same gradients)")  # fmt: skip
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
                for cb in self.callbacks:
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
        return self._finish(reason)

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
        return stop and cfg.early_stopping

    @contextlib.contextmanager
    def _graceful_stop(self) -> Iterator[None]:
        """Ctrl-C or SIGTERM ends the run at the next step boundary with ``last`` saved, so a resume
        is exact; a second Ctrl-C stops at once."""

        def handler(signum: int, frame: Any) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
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

    # -- files ---------------------------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "val_loss": _finite_or_none(self.records[-1].val_loss) if self.records else None,
            "best_val_loss": self.early.best_loss if math.isfinite(self.early.best_loss) else None,
            "best_step": self.early.best_step,
            "train_config": to_dict(self.cfg),
            "data": {k: self.data_meta.get(k) for k in ("source", "kind")},
            "chat_template": "dialogue" if self.data_meta.get("kind") == "dialogue" else "play",
        }

    def _save(self, which: str) -> None:
        if not self.dist.is_main:
            return
        state = self._state() if which == "last" else None
        checkpoint.save(self.run_dir / which, self.raw_model, self.tokenizer, self._meta(), state)

    def _best_note(self) -> str:
        if self.early.best_step < 0:
            return "no checkpoint was saved (there was no evaluation yet)"
        return f"best (step {self.early.best_step}) is kept"

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "elapsed": self.elapsed,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.get_state(),
            "rng": rng_state(),
            "early": [self.early.best_loss, self.early.best_step, self.early.bad_evals],
            "records": [[getattr(r, c) for c in StepRecord.__dataclass_fields__] for r in self.records],
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        saved = "muon" if "optimizers" in state["optimizer"] else "adamw"  # Muon's is a pair (optim.py)
        if saved != self.cfg.optimizer:
            raise ConfigError(
                f"cannot resume {self.run_dir} with optimizer {self.cfg.optimizer}: it was trained with"
                f" {saved}; resume with --optimizer {saved}, or train into a new --out"
            )
        # Loading puts back the saved param groups; keep this config's LR scales (--muon-lr, --lr).
        scales = [group.get("lr_scale", 1.0) for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, scale in zip(self.optimizer.param_groups, scales, strict=True):
            group["lr_scale"] = scale
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.set_state(state["sampler"])
        restore_rng(state["rng"])
        if self.dist.enabled:
            # `last` holds rank 0's random state; give the other ranks their own dropout streams
            # again (derived from the seed, rank and step, so a resume is repeatable).
            torch.manual_seed(self.cfg.seed + self.dist.rank + 1_000_003 * self.step)
        best, best_step, bad = state["early"]
        self.early = EarlyStopState(float(best), int(best_step), int(bad))
        self.records = [StepRecord(*row) for row in state["records"]]

    def _write_config(self, data_dir: Path, init_from: Path | None) -> None:
        doc = {"model": to_dict(self.model_cfg), "train": to_dict(self.cfg), "data": str(data_dir),
               "init_from": str(init_from) if init_from else None}  # fmt: skip
        atomic_write_text(self.run_dir / "config.json", json.dumps(doc, indent=1))

    def _finish(self, reason: str) -> TrainResult:
        best = self.early.best_loss
        result = TrainResult(self.run_dir, best, self.early.best_step, self.step, reason, self.elapsed,
                             self.precision.name)  # fmt: skip
        if self.dist.is_main:
            if self.records:
                fig = plot_losses(self.records, self.early.best_step)
                atomic_write_bytes(self.run_dir / "loss.png", png_bytes(fig))
            atomic_write_text(self.run_dir / "summary.json", json.dumps(result.to_dict(), indent=1))
            for cb in self.callbacks:
                cb.on_end(result.to_dict())
        distributed.shutdown(self.dist)
        return result


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a step without an evaluation records ``null``."""
    return value if math.isfinite(value) else None


@torch.no_grad()
def evaluate_tokens(
    model: GPT, tokens: np.ndarray, batch_size: int, precision: Any, max_windows: int = 0
) -> float:
    """Mean loss over consecutive, non-overlapping context windows of ``tokens`` (a whole split,
    or its first ``max_windows`` windows): the number ``minigpt2 eval`` reports."""
    T = model.config.block_size
    starts = np.arange(0, len(tokens) - T, T)
    if max_windows:
        starts = starts[:max_windows]
    if len(starts) == 0:
        raise ConfigError(f"the split has {len(tokens)} tokens, fewer than one context window ({T + 1})")
    device = model.device
    model.eval()
    total = 0.0
    for i in range(0, len(starts), batch_size):
        x, y = data.windows(tokens, starts[i : i + batch_size], T)
        with precision.autocast():
            _, loss = model(x.to(device), y.to(device))
        assert loss is not None
        total += float(loss) * len(x)
    return total / len(starts)


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
