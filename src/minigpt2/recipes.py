"""Ready-made runs: the default chatbot that ``make chat``, ``minigpt2 quickstart`` and the notebook use.

``ensure_chatbot`` prepares the corpus if its data folder is missing, trains the ``chat`` preset if
the run has no ``best`` checkpoint yet (resuming an interrupted run), and returns the run directory.
A run that already exists is used as it is, so the second ``make chat`` starts chatting at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from minigpt2 import checkpoint, data
from minigpt2.core import config
from minigpt2.fileio import recover_dir
from minigpt2.training.metrics import Callback

DEFAULT_SOURCE = "chatterbot:english"


def default_paths(source: str = DEFAULT_SOURCE, root: Path = Path(".")) -> tuple[Path, Path]:
    """The data folder and run directory used for ``source``: ``data/<name>``, ``runs/chat-<name>``."""
    name = source.replace(":", "-").replace("/", "_")
    return root / "data" / name, root / "runs" / f"chat-{name}"


def has_model(run_dir: Path) -> bool:
    return (recover_dir(run_dir / "best") / checkpoint.META).is_file()


def is_ready(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a chatbot to talk to now: a best checkpoint, and a training that
    ended (or one that cannot be resumed). Otherwise ``ensure_chatbot`` trains or finishes it."""
    resumable = (recover_dir(run_dir / "last") / checkpoint.META).is_file()
    finished = (run_dir / "summary.json").is_file()  # training ended (or was stopped with Ctrl-C)
    return has_model(run_dir) and (finished or not resumable)


def ensure_chatbot(
    source: str = DEFAULT_SOURCE,
    data_dir: Path | None = None,
    run_dir: Path | None = None,
    preset: str = "chat",
    overrides: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
) -> Path:
    """A trained run for ``source``, training one (or finishing an interrupted one) if needed."""
    default_data, default_run = default_paths(source)
    data_dir, run_dir = data_dir or default_data, run_dir or default_run
    if is_ready(run_dir):
        return run_dir
    resume = (recover_dir(run_dir / "last") / checkpoint.META).is_file()
    # An interrupted run goes on with the settings it started with (a newer preset may differ).
    if resume:
        model_cfg, train_cfg = config.saved_run_configs(run_dir, overrides)
    else:
        model_cfg, train_cfg = config.resolve(preset, overrides=overrides)
    if not (data_dir / "meta.json").is_file():
        data.prepare(source, data_dir, block_size=model_cfg.block_size)
    from minigpt2.training.trainer import train

    train(data_dir, run_dir, model_cfg, train_cfg, resume=resume, callbacks=callbacks)
    return run_dir
