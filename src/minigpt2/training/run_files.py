"""What a training run writes and reads back: ``RUN/best`` and ``RUN/last``, ``config.json``,
``summary.json`` and ``loss.png``.

``best`` holds the weights of the best evaluation so far (early stopping decides when it is
written); ``last`` adds the training state (optimizer, scaler, sampler, random state, counters,
metrics), so a resume from it continues exactly, bit for bit. ``RunFiles`` does this for the
``Trainer``; the checkpoint format itself is ``minigpt2/storage/checkpoint.py``.
Tests: ``pytest tests/training/test_train.py tests/core/test_optim.py`` (resume, fine-tuning, switching
optimizer).
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from minigpt2.core.config import to_dict
from minigpt2.core.schedule import EarlyStopState
from minigpt2.errors import CheckpointError, ConfigError
from minigpt2.storage import checkpoint
from minigpt2.storage.fileio import atomic_write_bytes, atomic_write_text
from minigpt2.training import distributed
from minigpt2.training.metrics import Callback, StepRecord, plot_losses, png_bytes, read_records
from minigpt2.training.runstate import TrainResult, restore_rng, rng_state
from minigpt2.training.setup import RunParts


class RunFiles:
    """A run's files: saving ``best`` and ``last``, resuming from ``last``, ``config.json`` and the
    summary. It reads and restores the run's ``RunParts``; ``message`` logs a line."""

    def __init__(self, parts: RunParts, message: Callable[[str], None]) -> None:
        self.parts, self.message = parts, message

    def meta(self) -> dict[str, Any]:
        p = self.parts
        return {
            "step": p.step,
            "val_loss": _finite_or_none(p.records[-1].val_loss) if p.records else None,
            "best_val_loss": p.early.best_loss if math.isfinite(p.early.best_loss) else None,
            "best_step": p.early.best_step,
            "train_config": to_dict(p.cfg),
            "data": {
                **{k: p.data_meta.get(k) for k in ("source", "kind")},
                "fingerprint": p.data_fingerprint,
            },
            "chat_template": "dialogue" if p.data_meta.get("kind") == "dialogue" else "play",
        }

    def save(self, which: str) -> None:
        p = self.parts
        if not p.dist.is_main:
            return
        state = self.state() if which == "last" else None
        checkpoint.save(p.run_dir / which, p.raw_model, p.tokenizer, self.meta(), state)

    def best_note(self) -> str:
        if self.parts.early.best_step < 0:
            return "no checkpoint was saved (there was no evaluation yet)"
        return f"best (step {self.parts.early.best_step}) is kept"

    def state(self) -> dict[str, Any]:
        p = self.parts
        return {
            "step": p.step,
            "elapsed": p.elapsed,
            "optimizer": p.optimizer.state_dict(),
            "scaler": p.loop.scaler.state_dict(),
            "sampler": p.batches.generator.get_state(),
            "rng": rng_state(),
            "early": [p.early.best_loss, p.early.best_step, p.early.bad_evals],
            "records": [[getattr(r, c) for c in StepRecord.__dataclass_fields__] for r in p.records],
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Put a resumed run back where ``last`` left it: the step, time, optimizer, scaler, batches'
        order, random state, early stopping and metrics."""
        p = self.parts
        if "from_best" in state:
            self._restore_from_best(state["from_best"])
            return
        p.loop.step, p.elapsed = int(state["step"]), float(state["elapsed"])
        saved = "muon" if "optimizers" in state["optimizer"] else "adamw"  # Muon's is a pair (core/muon.py)
        if saved != p.cfg.optimizer:
            raise ConfigError(
                f"cannot resume {p.run_dir} with optimizer {p.cfg.optimizer}: it was trained with"
                f" {saved}; resume with --optimizer {saved}, or train into a new --out"
            )
        # Loading puts back the saved param groups; keep this config's LR scales (--muon-lr, --lr).
        scales = [group.get("lr_scale", 1.0) for group in p.optimizer.param_groups]
        p.optimizer.load_state_dict(state["optimizer"])
        for group, scale in zip(p.optimizer.param_groups, scales, strict=True):
            group["lr_scale"] = scale
        p.loop.scaler.load_state_dict(state["scaler"])
        p.batches.generator.set_state(state["sampler"])
        restore_rng(state["rng"])
        if p.dist.enabled:
            # `last` holds rank 0's random state; give the other ranks their own dropout streams
            # again (derived from the seed, rank and step, so a resume is repeatable).
            torch.manual_seed(p.cfg.seed + p.dist.rank + 1_000_003 * p.step)
        best, best_step, bad = state["early"]
        p.loop.early = EarlyStopState(float(best), int(best_step), int(bad))
        p.records = [StepRecord(*row) for row in state["records"]]

    def _restore_from_best(self, best: dict[str, Any]) -> None:
        """Go on from ``best``'s weights at its step when ``last`` is gone: the LR schedule and early
        stopping continue from there; the optimizer's moments, the batches' order and the steps
        after best are lost (the metrics up to best are read back from ``metrics.csv``)."""
        p = self.parts
        step, loss = best.get("step"), best.get("val_loss")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CheckpointError(f"{p.run_dir / 'best'} does not say its step; it cannot be resumed")
        val_loss = float(loss) if isinstance(loss, (int, float)) and not isinstance(loss, bool) else math.inf
        p.loop.step = step
        p.loop.early = EarlyStopState(val_loss, step, 0)
        p.records = read_records(p.run_dir / "metrics.csv", step)
        p.elapsed = p.records[-1].elapsed_s if p.records else 0.0
        p.batches.generator.manual_seed(p.cfg.seed + 1_000_003 * step)  # new batches, not the lost ones
        self.message(
            f"warning: {p.run_dir} has no last/ checkpoint: going on from best/ (step {step},"
            f" val loss {val_loss:.4f}); the optimizer's state and any steps after {step} are lost, so"
            " this run will not repeat an uninterrupted one exactly"
        )

    def write_config(self, data_dir: Path, init_from: Path | None) -> None:
        p = self.parts
        doc: dict[str, Any] = {"model": to_dict(p.model_cfg), "train": to_dict(p.cfg), "data": str(data_dir),
                               "init_from": str(init_from) if init_from else None}  # fmt: skip
        if p.fit is not None:  # what fit_to_budget chose, and why
            doc["fit"] = p.fit.to_dict()
        elif (earlier := _saved_fit(p.run_dir / "config.json")) is not None:
            doc["fit"] = earlier  # a resumed run keeps the record of the fit it started with
        atomic_write_text(p.run_dir / "config.json", json.dumps(doc, indent=1))

    def finish(self, reason: str, callbacks: Sequence[Callback]) -> TrainResult:
        """The run's summary, ``loss.png`` and ``summary.json``; the processes' group closed."""
        p = self.parts
        result = TrainResult(p.run_dir, p.early.best_loss, p.early.best_step, p.step, reason, p.elapsed,
                             p.precision.name)  # fmt: skip
        if p.dist.is_main:
            if p.records:
                fig = plot_losses(p.records, p.early.best_step)
                atomic_write_bytes(p.run_dir / "loss.png", png_bytes(fig))
            atomic_write_text(p.run_dir / "summary.json", json.dumps(result.to_dict(), indent=1))
            for cb in callbacks:
                cb.on_end(result.to_dict())
        if p.dist.enabled:
            # DDP holds the process group: let it go now, so that the group's threads end with
            # ``shutdown`` below rather than at the interpreter's exit, where gloo can abort.
            p.model, p.batches.no_sync = p.raw_model, None
            gc.collect()
        distributed.shutdown(p.dist)
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
