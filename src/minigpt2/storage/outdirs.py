"""Where a command may write a folder: never over a run, never over someone else's files.

Every command that writes a folder (``prepare``, ``train``, ``export``, ``import-hf``) checks its
target with ``check_target`` before it reads anything large or writes anything (a single file a
user names, such as ``/save FILE`` or the web page, goes through ``check_file_target``):

- a folder that is, or is inside, a minigpt2 run or checkpoint (what a folder is, the project's one
  answer: ``is_checkpoint``, ``run_checkpoint``, ``is_run``) is refused, whatever the command
  (``train`` and ``import-hf`` decide about their own runs themselves);
- a non-empty folder of another kind (a data folder, a Hugging Face export, anything else) is
  refused unless ``force`` is given;
- a missing or empty folder, or one the command itself wrote before (its own kind), is fine.

A single file is never written into a run, a checkpoint, a data folder or an export (their files
are the project's, read back by name), never over a folder, and never over a device, FIFO or
socket, whether named or reached through a link.

Refusals are one-line ``UserError``s naming the folder, what it holds and what to do.
Tests: ``pytest tests/storage/test_outdirs.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from minigpt2.errors import UserError
from minigpt2.storage.fileio import not_regular, read_small_text, recover_dir

META = "checkpoint.json"  # what makes a folder a checkpoint (checkpoint.py writes it)
EXPORT_MARKER = "minigpt2_vocab.json"  # written into every Hugging Face export

DESCRIPTIONS = {
    "run": "a minigpt2 run",
    "checkpoint": "a minigpt2 checkpoint",
    "data": "a prepared data folder",
    "export": "a Hugging Face export",
    "other": "other files",
}


def is_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` is a minigpt2 checkpoint: it holds the ``META`` file ``checkpoint.save``
    writes last."""
    return (folder / META).is_file()


def run_checkpoint(run_dir: Path, name: str) -> Path | None:
    """The run's ``best`` or ``last`` checkpoint (``name``): ``run_dir/name``, or its complete
    ``name.old`` twin where a crash fell inside ``fileio.publish_dir``; None when it has none."""
    folder = recover_dir(run_dir / name)
    return folder if is_checkpoint(folder) else None


def is_run(folder: Path) -> bool:
    """A run has a best/ or last/ checkpoint, or the config.json training writes first."""
    has_checkpoint = any(run_checkpoint(folder, name) is not None for name in ("best", "last"))
    return has_checkpoint or _is_run_config(folder / "config.json")


def _is_run_config(path: Path) -> bool:
    """A run's config.json holds its model and training settings (an export's holds GPT-2's)."""
    try:
        doc = json.loads(read_small_text(path))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "model" in doc and "train" in doc


def kind_of(folder: Path) -> str | None:
    """What ``folder`` holds: run, checkpoint, data, export, other; None if missing or empty."""
    if not folder.is_dir():
        return "other" if folder.exists() else None
    if is_checkpoint(folder):
        return "checkpoint"
    if is_run(folder):
        return "run"
    names = {p.name for p in folder.iterdir()}
    if not names:
        return None
    if ".lock" in names:  # a run whose training is starting (or died before its first write)
        return "run"
    if EXPORT_MARKER in names:
        return "export"
    if "meta.json" in names and {"train.bin", "val.bin"} & names:
        return "data"
    return "other"


def enclosing_run(path: Path) -> Path | None:
    """The run or checkpoint folder that ``path`` lies inside (not ``path`` itself), if any."""
    for parent in path.resolve().parents:
        if is_checkpoint(parent) or is_run(parent):
            return parent
    return None


def check_target(out: Path, writes: str, *, force: bool = False) -> str | None:
    """Refuse to write ``writes`` (a kind of ``kind_of``) into ``out`` where that could destroy
    something; returns ``out``'s kind (None: missing or empty) for the caller's own rules."""
    what = DESCRIPTIONS[writes]
    inside = enclosing_run(out)
    if inside is not None:
        raise UserError(f"{out} is inside {DESCRIPTIONS[kind_of(inside) or 'run']} ({inside}); "
                        f"write {what} to a folder of its own")  # fmt: skip
    kind = kind_of(out)
    if kind is None or kind == writes:
        return kind
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder for {what}")
    if kind in ("run", "checkpoint"):
        raise UserError(
            f"{out} is {DESCRIPTIONS[kind]}; write {what} to another folder (the run stays whole)"
        )
    if not force:
        raise UserError(
            f"{out} is not empty (it holds {DESCRIPTIONS[kind]}); choose another folder,"
            " or add --force to write into it"
        )
    return kind


def check_file_target(path: Path, where: str) -> Path:
    """Refuse, in one line that starts with ``where`` ("cannot save the conversation to FILE"), to
    write a single file at ``path``: over a folder or a device, FIFO or socket, or into a folder of
    the project's own (a run, a checkpoint, a data folder, an export), whether ``path`` names it or
    a link leads there. Returns the file the write lands on (links followed) for the caller."""
    real = Path(os.path.realpath(path.expanduser()))
    try:
        kind = not_regular(os.stat(real).st_mode)
    except OSError:  # nothing there yet
        kind = None
    if kind is not None:
        choose = "give a file name" if kind == "a folder" else "choose a file name"
        raise UserError(f"{where}: it is {kind}, not a file; {choose}")
    folder = real.parent
    owner = folder if kind_of(folder) in ("run", "checkpoint", "data", "export") else enclosing_run(real)
    if owner is not None:
        raise UserError(f"{where}: {owner} is {DESCRIPTIONS[kind_of(owner) or 'run']}, whose files "
                        "minigpt2 reads back; choose a file outside it")  # fmt: skip
    return real
