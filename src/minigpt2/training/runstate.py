"""Where a training run starts from, and what keeps a run directory consistent.

- ``load_start``: a fresh run, a resumed one (``RUN/last``), or fine-tuning from trained weights
  (``init_from``, with the vocabulary extended by the new corpus' characters);
- ``RunLock``: one training process per run directory, and a tidy one after a crash;
- ``rng_state`` / ``restore_rng``: the random state that makes a resumed run identical;
- ``TrainResult``: the summary a run ends with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt2 import data
from minigpt2.core.config import ModelConfig, TrainConfig
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.errors import ConfigError, UserError, WriteError
from minigpt2.storage import checkpoint
from minigpt2.storage.fileio import clean_up_after_crash
from minigpt2.storage.outdirs import check_target, run_checkpoint


@dataclass
class TrainResult:
    run_dir: Path
    best_val_loss: float
    best_step: int
    steps: int
    stop_reason: str
    wall_time_s: float
    precision: str
    stop_signal: int | None = None  # SIGINT or SIGTERM when one stopped the run, for the exit status

    @property
    def bits_per_char(self) -> float:
        """Val loss in bits per character (the loss is in nats): lower is better, 0 is perfect."""
        return self.best_val_loss / math.log(2)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("stop_signal")  # the process's business; stop_reason already says "interrupted"
        d["run_dir"] = str(self.run_dir)
        d["best_val_loss"] = self.best_val_loss if math.isfinite(self.best_val_loss) else None
        d["bits_per_char"] = self.bits_per_char if math.isfinite(self.best_val_loss) else None
        return d


class RunLock:
    """An exclusive lock on ``RUN/.lock``: a second training into the same run directory refuses
    instead of interleaving checkpoints. The OS drops the lock if the process dies. Holding it, it
    tidies what a killed process left behind (``fileio.clean_up_after_crash``)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        check_target(run_dir, "run")  # a run goes into a new or empty folder, or its own run
        missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
        self.created = missing[-1] if missing else None  # a failed start removes it (``abandon``)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise WriteError(
                f"cannot write to {run_dir}: {err.strerror or err}; choose another --out"
            ) from None
        try:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows: no advisory locks; run unlocked
            pass
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise UserError(
                f"another training process is using {run_dir}; wait for it to finish or use another --out"
            ) from None
        with contextlib.suppress(OSError):  # tidying is a courtesy; a real problem shows when writing
            clean_up_after_crash(run_dir)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def abandon(self) -> None:
        """Release the lock of a run that failed to start; the folders this lock created are
        removed again (they hold nothing but the lock file), so a failed command writes nothing."""
        self.release()
        if self.created is not None:
            with contextlib.suppress(OSError):
                (self.run_dir / ".lock").unlink()
                for folder in (self.run_dir, *self.run_dir.parents):
                    folder.rmdir()
                    if folder == self.created:
                        break


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Start:
    """Everything a run begins with."""

    tokenizer: CharTokenizer
    train: np.ndarray
    val: np.ndarray
    model_cfg: ModelConfig
    weights: dict[str, torch.Tensor] | None  # None: fresh GPT-2 initialisation
    train_state: dict[str, Any] | None  # None: step 0


def load_start(
    run_dir: Path,
    dataset: data.Dataset,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    *,
    resume: bool,
    init_from: Path | None,
) -> Start:
    """Decide how the run begins: resume ``RUN/last``, fine-tune ``init_from``, or start fresh."""
    last, best = (run_checkpoint(run_dir, n) for n in ("last", "best"))
    has_run = last is not None or best is not None
    if resume:
        if last is not None:
            ckpt = checkpoint.load(last)
            state = checkpoint.load_train_state(ckpt.path)
        elif best is not None:
            # last/ was lost (a full disk at its first save, or deleted): go on from best/'s weights,
            # at its step, with what best/ cannot hold started afresh (``RunFiles.restore``).
            ckpt = checkpoint.load(best)
            state = {"from_best": {"step": ckpt.meta.get("step"), "val_loss": ckpt.meta.get("best_val_loss")}}
        else:
            raise UserError(f"nothing to resume in {run_dir} (no last/ or best/ checkpoint); drop --resume")
        _check_same_data(run_dir, ckpt.meta, dataset)
        train, val = data.remap(dataset, ckpt.tokenizer)
        weights = ckpt.build_model().state_dict()
        return Start(ckpt.tokenizer, train, val, ckpt.model_config, weights, state)
    if has_run:
        raise UserError(
            f"{run_dir} already holds a trained model; continue it with --resume, or choose another --out"
        )
    if init_from is not None:
        return _fine_tune_start(dataset, model_cfg, init_from)
    tok = dataset.tokenizer
    return Start(tok, dataset.train, dataset.val, dataclasses.replace(model_cfg, vocab_size=tok.vocab_size),
                 None, None)  # fmt: skip


def _check_same_data(run_dir: Path, meta: dict[str, Any], dataset: data.Dataset) -> None:
    """A resumed run goes on with the data it was trained on: its val losses compare only on the
    same val split, and ``best`` is kept by them. (Runs older than the fingerprint are not checked.)"""
    recorded = meta.get("data", {}).get("fingerprint") if isinstance(meta.get("data"), dict) else None
    if recorded is not None and recorded != data.fingerprint(dataset):
        source = dataset.meta.get("source", "this data")
        raise UserError(
            f"cannot resume {run_dir} on {source}: it was trained on other data (vocabulary or"
            f" validation split differ); to go on training it on new data, start a new run with"
            f" --init-from {run_dir}"
        )


def _fine_tune_start(dataset: data.Dataset, model_cfg: ModelConfig, init_from: Path) -> Start:
    """Trained weights, with one new embedding row per character the new corpus adds."""
    ckpt = checkpoint.load(init_from)
    base = ckpt.model_config
    if model_cfg.block_size > base.block_size:
        raise ConfigError(
            f"block_size {model_cfg.block_size} is larger than the model's context ({base.block_size});"
            f" fine-tuning can only keep or shrink it"
        )
    tok = ckpt.tokenizer.extended(dataset.tokenizer.chars)
    train, val = data.remap(dataset, tok)
    new_cfg = dataclasses.replace(
        base,
        vocab_size=tok.vocab_size,
        block_size=model_cfg.block_size,
        dropout=model_cfg.dropout,
        attn_impl=model_cfg.attn_impl,
    )
    weights = ckpt.build_model().state_dict()
    weights.pop(checkpoint.TIED, None)
    wte = weights["transformer.wte.weight"]
    extra = torch.randn(tok.vocab_size - wte.size(0), wte.size(1)) * 0.02  # GPT-2 init for new chars
    weights["transformer.wte.weight"] = torch.cat([wte, extra])
    weights["transformer.wpe.weight"] = weights["transformer.wpe.weight"][: model_cfg.block_size]
    return Start(tok, train, val, new_cfg, weights, None)
