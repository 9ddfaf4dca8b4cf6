"""The configs a training starts with: a fresh run, a resumed one, or a fine-tuning of a trained model.

``resolve`` in ``core/config.py`` merges preset < config file < overrides; this adds the two cases
where an existing run decides part of it. Resuming keeps the run's saved model (only its training
settings may change); fine-tuning keeps the trained model's shape (only the context, the dropout
and the attention implementation may change). The ``minigpt2 train`` command calls it, and its
error messages name the command's flags. Also the two files settings come from:
``read_config_file`` (``--config FILE``) and ``saved_run_configs`` (``RUN/config.json``).
Tests: ``pytest tests/cli/test_train_cli.py``.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

from minigpt2.core import config
from minigpt2.core.config import ModelConfig, TrainConfig
from minigpt2.errors import ConfigError, UserError
from minigpt2.storage import checkpoint
from minigpt2.storage.fileio import read_small_text
from minigpt2.storage.outdirs import run_checkpoint
from minigpt2.training.fit import FITTED

# What fine-tuning may change about the trained model, and what it may not.
SHAPE = ("n_layer", "n_head", "n_embd")
ADJUSTABLE = ("block_size", "dropout", "attn_impl")


def configs_for_training(
    preset: str | None,
    file_values: dict[str, Any],
    overrides: dict[str, Any],
    resume_dir: Path | None = None,
    init_from: Path | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """Preset < config file < ``overrides``; with ``resume_dir`` the run's saved configs < both;
    with ``init_from`` the trained model's shape (only block size, dropout and attention may change).

    ``overrides`` holds only the settings the user gave explicitly: one that contradicts the saved
    or trained model is refused rather than silently dropped. ``preset`` None is the default preset
    fitted to the time budget on this machine (``fit_to_budget``), when there is a budget and none of
    the settings a fit chooses (``fit.FITTED``) was given; a preset named is trained as it is.
    """
    if resume_dir is not None:
        if preset is not None:  # the run's own settings are what it resumes with
            raise UserError(f"--resume goes on with the run's own settings; drop --preset {preset}")
        if overrides.get("fit_to_budget"):
            raise UserError("--resume goes on with the settings the run was fitted to; drop --fit-to-budget")
        model_cfg, train_cfg = saved_run_configs(resume_dir, {**file_values, **overrides})
        changed = [k for k, v in overrides.items() if hasattr(model_cfg, k) and getattr(model_cfg, k) != v]
        if changed:
            raise UserError(f"--resume keeps the run's model settings; drop --{changed[0].replace('_', '-')}")
        return model_cfg, train_cfg
    model_cfg, train_cfg = config.resolve(preset or config.DEFAULT_PRESET, file_values, overrides)
    given = {k.replace("-", "_") for k in (*file_values, *overrides)}
    if preset is None and init_from is None and train_cfg.max_minutes > 0 and not FITTED & given:
        train_cfg = dataclasses.replace(train_cfg, fit_to_budget=True)
    if init_from is not None:
        base = checkpoint.load(init_from).model_config
        if any(getattr(base, k) != overrides[k] for k in SHAPE if k in overrides):
            raise UserError("--init-from keeps the trained model's shape; drop --n-layer/--n-head/--n-embd")
        model_cfg = dataclasses.replace(base, **{k: overrides[k] for k in ADJUSTABLE if k in overrides})
    return model_cfg, train_cfg


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a flat TOML (or JSON) file of config fields, e.g. ``n_layer = 6`` or ``lr = 1e-3``."""
    try:
        text = read_small_text(path)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file {path} is not UTF-8 text: byte 0x{err.object[err.start]:02x} at offset"
            f" {err.start}; save it as UTF-8"
        ) from None
    try:
        values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid TOML/JSON: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a table of settings")
    return values


def saved_run_configs(
    run_dir: Path, train_overrides: dict[str, Any] | None = None
) -> tuple[ModelConfig, TrainConfig]:
    """The configs a run was trained with (``RUN/config.json``), for resuming it: its model as
    saved, its training settings under ``train_overrides`` (``None`` values are skipped)."""
    path = run_dir / "config.json"
    if not path.exists() and run_checkpoint(run_dir, "best") is not None:  # an import, or a copy
        raise ConfigError(
            f"cannot resume {run_dir}: it was not trained here (no config.json, as after import-hf);"
            f" to train it further, start a new run with --init-from {run_dir}"
        )
    try:
        saved = json.loads(read_small_text(path))
        model, train = saved["model"], saved["train"]
    except (OSError, ValueError, TypeError, KeyError):
        raise ConfigError(f"cannot resume: {path} is missing or unreadable") from None
    given = {
        k: v
        for k, v in (train_overrides or {}).items()
        if v is not None and k in config.field_names(TrainConfig)
    }
    # A fit was made when the run started, and its width, batch and steps are the saved settings.
    resumed = {**train, **given, "fit_to_budget": False}
    return config.from_dict(ModelConfig, model), config.from_dict(TrainConfig, resumed)
