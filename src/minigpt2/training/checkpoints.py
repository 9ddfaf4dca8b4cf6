"""What a training run writes and reads back: ``RUN/best`` and ``RUN/last``, ``config.json``,
``summary.json`` and ``loss.png``; and ``evaluate_tokens``, the loss ``minigpt2 eval`` reports.

``best`` holds the weights of the best evaluation so far (early stopping decides when it is
written); ``last`` adds the training state (optimizer, scaler, sampler, random state, counters,
metrics), so a resume from it continues exactly, bit for bit. ``RunFiles`` is the part of the
``Trainer`` that does this; the checkpoint format itself is ``minigpt2/checkpoint.py``.
Tests: ``pytest tests/test_train.py tests/test_optim.py`` (resume, fine-tuning, switching optimizer).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt2 import checkpoint
from minigpt2.core.batches import windows
from minigpt2.core.config import ModelConfig, TrainConfig, to_dict
from minigpt2.core.model import GPT
from minigpt2.core.schedule import EarlyStopState
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.errors import CheckpointError, ConfigError
from minigpt2.fileio import atomic_write_bytes, atomic_write_text
from minigpt2.precision import Precision
from minigpt2.training import distributed
from minigpt2.training.metrics import Callback, StepRecord, plot_losses, png_bytes, read_records
from minigpt2.training.runstate import TrainResult, restore_rng, rng_state


class RunFiles:
    """The ``Trainer``'s files: saving ``best`` and ``last``, resuming from ``last``, the summary.
    The attributes below are what they read; ``setup.RunSetup`` builds them."""

    run_dir: Path
    cfg: TrainConfig
    model_cfg: ModelConfig
    dist: distributed.DistInfo
    precision: Precision
    raw_model: GPT
    tokenizer: CharTokenizer
    data_meta: dict[str, Any]
    data_fingerprint: str
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: torch.Generator
    callbacks: list[Callback]
    # The training progress, saved in `last` and restored on a resume.
    step: int
    elapsed: float  # seconds of training so far
    records: list[StepRecord]
    early: EarlyStopState

    def _meta(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "val_loss": _finite_or_none(self.records[-1].val_loss) if self.records else None,
            "best_val_loss": self.early.best_loss if math.isfinite(self.early.best_loss) else None,
            "best_step": self.early.best_step,
            "train_config": to_dict(self.cfg),
            "data": {
                **{k: self.data_meta.get(k) for k in ("source", "kind")},
                "fingerprint": self.data_fingerprint,
            },
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

    def _message(self, text: str) -> None: ...  # setup.RunSetup's: the log and the callbacks

    def _restore(self, state: dict[str, Any]) -> None:
        if "from_best" in state:
            self._restore_from_best(state["from_best"])
            return
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

    def _restore_from_best(self, best: dict[str, Any]) -> None:
        """Go on from ``best``'s weights at its step when ``last`` is gone: the LR schedule and early
        stopping continue from there; the optimizer's moments, the batches' order and the steps
        after best are lost (the metrics up to best are read back from ``metrics.csv``)."""
        step, loss = best.get("step"), best.get("val_loss")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CheckpointError(f"{self.run_dir / 'best'} does not say its step; it cannot be resumed")
        val_loss = float(loss) if isinstance(loss, (int, float)) and not isinstance(loss, bool) else math.inf
        self.step = step
        self.early = EarlyStopState(val_loss, step, 0)
        self.records = read_records(self.run_dir / "metrics.csv", step)
        self.elapsed = self.records[-1].elapsed_s if self.records else 0.0
        self.sampler.manual_seed(self.cfg.seed + 1_000_003 * step)  # new batches, not the lost ones
        self._message(
            f"warning: {self.run_dir} has no last/ checkpoint: going on from best/ (step {step},"
            f" val loss {val_loss:.4f}); the optimizer's state and any steps after {step} are lost, so"
            " this run will not repeat an uninterrupted one exactly"
        )

    def _write_config(self, data_dir: Path, init_from: Path | None) -> None:
        doc: dict[str, Any] = {"model": to_dict(self.model_cfg), "train": to_dict(self.cfg),
                               "data": str(data_dir),
                               "init_from": str(init_from) if init_from else None}  # fmt: skip
        fit = getattr(self, "fit", None)  # setup.RunSetup's: what fit_to_budget chose, and why
        if fit is not None:
            doc["fit"] = fit.to_dict()
        elif (earlier := _saved_fit(self.run_dir / "config.json")) is not None:
            doc["fit"] = earlier  # a resumed run keeps the record of the fit it started with
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


def _saved_fit(path: Path) -> Any:
    """The ``fit`` record of a run's ``config.json``, if it has one."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("fit")
    except (OSError, ValueError, AttributeError):
        return None


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
        x, y = windows(tokens, starts[i : i + batch_size], T)
        with precision.autocast():
            _, loss = model(x.to(device), y.to(device))
        assert loss is not None
        total += float(loss) * len(x)
    return total / len(starts)
