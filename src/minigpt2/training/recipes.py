"""Ready-made runs: the default chatbot that ``make chat``, ``minigpt2 quickstart`` and the notebook use.

``ensure_chatbot`` prepares the corpus if its data folder is missing (with the text its recipe mixes
in), trains the recipe's preset if the run has no ``best`` checkpoint yet (resuming an interrupted
run), and returns the run directory. A run that already exists is used as it is, so the second
``make chat`` starts chatting at once. ``benchmarks/chat_quality.py`` measures the recipes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minigpt2 import data
from minigpt2.core import config
from minigpt2.storage.outdirs import run_checkpoint
from minigpt2.training.fit import FITTED
from minigpt2.training.metrics import Callback
from minigpt2.training.run_configs import saved_run_configs

DEFAULT_SOURCE = "chatterbot:english"


@dataclass(frozen=True)
class ChatRecipe:
    """How a default chatbot is trained: a preset (plus overrides) on its corpus, with ``mix``, another
    SOURCE, making up ``mix_share`` of the training characters (``data.prepare``)."""

    preset: str = "chat"
    overrides: dict[str, Any] = field(default_factory=dict)
    mix: str | None = None
    mix_share: float = 0.5


# The `chat` preset on the corpus alone: the recipe of any corpus not measured below, and the
# reference of benchmarks/chat_quality.py.
ALONE = ChatRecipe()

# English dialogues are few (190,777 training characters): the `chat` preset memorises them within
# ~1,100 steps (val loss 0.875, then rising). With Shakespeare's works as half of the training
# characters, it learns English spelling from them and is still improving when the 8 minutes end
# (docs/performance.md, section 3).
ENGLISH = ChatRecipe(mix="shakespeare", mix_share=0.5)

# The Italian dialogues are four times fewer (49,982 characters): alone, val loss 1.59 at step 300,
# then rising. English text still teaches the turns' shape, punctuation and Latin letters: with
# Shakespeare as three quarters of the training characters, 1.48 (half: 1.51; the Spanish,
# Portuguese, French and English dialogues as half: 1.53).
ITALIAN = ChatRecipe(mix="shakespeare", mix_share=0.75)


def recipe_for(source: str) -> ChatRecipe:
    """The recipe of the default chatbot for ``source``: measured for English and Italian; any other
    corpus trains the `chat` preset on its own text."""
    if source in ("chatterbot", "chatterbot:english"):
        return ENGLISH
    if source == "chatterbot:italian":
        return ITALIAN
    return ALONE


def recipe_configs(
    recipe: ChatRecipe, preset: str | None = None, overrides: dict[str, Any] | None = None
) -> tuple[config.ModelConfig, config.TrainConfig]:
    """What ``recipe`` trains: its preset and overrides, fitted to this machine and the budget
    (``fit_to_budget``) unless a setting the fit chooses is given; ``preset`` given: as it is."""
    settings = {**(recipe.overrides if preset is None else {}), **(overrides or {})}
    model_cfg, train_cfg = config.resolve(preset or recipe.preset, overrides=settings)
    if preset is None and not FITTED & set(settings) and train_cfg.max_minutes > 0:
        train_cfg = dataclasses.replace(train_cfg, fit_to_budget=True)
    return model_cfg, train_cfg


def slug(source: str) -> str:
    """The folder name a SOURCE gets under ``data/`` or ``runs/`` (``prepare`` without ``--out``,
    the default chatbot): an existing file's or folder's stem, else the source with ":" as "-"
    (``chatterbot:english`` -> ``chatterbot-english``). Any character but letters, digits, "-" and
    "_" becomes "_", so whatever was typed (``..``, a path) names one folder inside that parent."""
    name = Path(source).stem if Path(source).exists() else source.replace(":", "-")
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "corpus"


def default_paths(source: str = DEFAULT_SOURCE, root: Path = Path(".")) -> tuple[Path, Path]:
    """The data folder and run directory used for ``source``: ``data/<name>`` (``data/<name>+<mix>``
    when its recipe mixes text in), ``runs/chat-<name>``."""
    mix = recipe_for(source).mix
    data_name = slug(source) + (f"+{slug(mix)}" if mix else "")
    return root / "data" / data_name, root / "runs" / f"chat-{slug(source)}"


def has_model(run_dir: Path) -> bool:
    return run_checkpoint(run_dir, "best") is not None


def is_ready(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a chatbot to talk to now: a best checkpoint, and a training that
    ended (or one that cannot be resumed). Otherwise ``ensure_chatbot`` trains or finishes it."""
    resumable = run_checkpoint(run_dir, "last") is not None
    finished = (run_dir / "summary.json").is_file()  # training ended (or was stopped with Ctrl-C)
    return has_model(run_dir) and (finished or not resumable)


def ensure_chatbot(
    source: str = DEFAULT_SOURCE,
    data_dir: Path | None = None,
    run_dir: Path | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
) -> Path:
    """A trained run for ``source``, training one (or finishing an interrupted one) if needed.

    ``preset`` None trains ``source``'s recipe (its preset and overrides); a preset given is trained
    as it is, on the recipe's data (mix included). ``overrides`` apply last."""
    default_data, default_run = default_paths(source)
    data_dir, run_dir = data_dir or default_data, run_dir or default_run
    if is_ready(run_dir):
        return run_dir
    recipe = recipe_for(source)
    resume = run_checkpoint(run_dir, "last") is not None
    # An interrupted run goes on with the settings it started with (a newer preset may differ).
    if resume:
        model_cfg, train_cfg = saved_run_configs(run_dir, overrides)
    else:
        model_cfg, train_cfg = recipe_configs(recipe, preset, overrides)
    if not (data_dir / "meta.json").is_file():
        block = model_cfg.block_size
        data.prepare(source, data_dir, block_size=block, mix=recipe.mix, mix_share=recipe.mix_share)
    from minigpt2.training.trainer import train

    train(data_dir, run_dir, model_cfg, train_cfg, resume=resume, callbacks=callbacks)
    return run_dir
