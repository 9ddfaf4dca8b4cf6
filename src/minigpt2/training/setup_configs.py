"""The configs a training starts with: a fresh run, a resumed one, or a fine-tuning of a trained model.

``resolve`` in ``core/config.py`` merges preset < config file < overrides; this adds the two cases
where an existing run decides part of it. Resuming keeps the run's saved model (only its training
settings may change); fine-tuning keeps the trained model's shape (only the context, the dropout
and the attention implementation may change). The ``minigpt2 train`` command calls it, and its
error messages name the command's flags.
Tests: ``pytest tests/test_train_cli.py``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from minigpt2 import checkpoint
from minigpt2.core import config
from minigpt2.core.config import ModelConfig, TrainConfig
from minigpt2.errors import UserError

# What fine-tuning may change about the trained model, and what it may not.
SHAPE = ("n_layer", "n_head", "n_embd")
ADJUSTABLE = ("block_size", "dropout", "attn_impl")


def configs_for_training(
    preset: str,
    file_values: dict[str, Any],
    overrides: dict[str, Any],
    resume_dir: Path | None = None,
    init_from: Path | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """Preset < config file < ``overrides``; with ``resume_dir`` the run's saved configs < both;
    with ``init_from`` the trained model's shape (only block size, dropout and attention may change).

    ``overrides`` holds only the settings the user gave explicitly: one that contradicts the saved
    or trained model is refused rather than silently dropped.
    """
    if resume_dir is not None:
        model_cfg, train_cfg = config.saved_run_configs(resume_dir, {**file_values, **overrides})
        changed = [k for k, v in overrides.items() if hasattr(model_cfg, k) and getattr(model_cfg, k) != v]
        if changed:
            raise UserError(f"--resume keeps the run's model settings; drop --{changed[0].replace('_', '-')}")
        return model_cfg, train_cfg
    model_cfg, train_cfg = config.resolve(preset, file_values, overrides)
    if init_from is not None:
        base = checkpoint.load(init_from).model_config
        if any(getattr(base, k) != overrides[k] for k in SHAPE if k in overrides):
            raise UserError("--init-from keeps the trained model's shape; drop --n-layer/--n-head/--n-embd")
        model_cfg = dataclasses.replace(base, **{k: overrides[k] for k in ADJUSTABLE if k in overrides})
    return model_cfg, train_cfg
