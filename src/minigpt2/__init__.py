"""minigpt2: a character-level GPT-2 you train on your own text and then talk to.

The package imports torch lazily: ``import minigpt2`` is instant, and names such as
``minigpt2.GPT`` load their module on first use. The tree shows the architecture: ``core`` (the
textbook), ``fast`` (the engine), ``training``, ``data``, ``storage`` (on-disk formats and safe
I/O), ``hardware`` (device and precision, measured), ``inference``, ``exports``, and the front ends
``cli``, ``serve`` and ``notebook``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "GPT": "minigpt2.core.model",
    "KVCache": "minigpt2.core.model",
    "ModelConfig": "minigpt2.core.config",
    "TrainConfig": "minigpt2.core.config",
    "SampleConfig": "minigpt2.core.config",
    "CharTokenizer": "minigpt2.core.tokenizer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minigpt2' has no attribute {name!r}")


# Modules that moved into the packages above: importing one by its old name says where it is now.
MOVED = {
    "minigpt2.fileio": "minigpt2.storage.fileio",
    "minigpt2.checkpoint": "minigpt2.storage.checkpoint",
    "minigpt2.outdirs": "minigpt2.storage.outdirs",
    "minigpt2.corpora": "minigpt2.data.corpora",
    "minigpt2.mixing": "minigpt2.data.mixing",
    "minigpt2.hf": "minigpt2.exports.hf",
    "minigpt2.hf_tokenizer": "minigpt2.exports.hf_tokenizer",
    "minigpt2.web": "minigpt2.exports.web",
    "minigpt2.precision": "minigpt2.hardware.precision",
    "minigpt2.machine": "minigpt2.hardware.machine",
    "minigpt2.conversation": "minigpt2.inference.conversation",
    "minigpt2.attention_maps": "minigpt2.notebook.attention_maps",
    "minigpt2.recipes": "minigpt2.training.recipes",
    "minigpt2.training.optim": "minigpt2.core.optim (Muon: minigpt2.core.muon)",
}


class _MovedFinder(importlib.abc.MetaPathFinder):
    """Asked last, for a module no other finder has: one that moved fails naming its new place."""

    def find_spec(
        self, fullname: str, path: Any, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname in MOVED:
            raise ModuleNotFoundError(f"{fullname} moved: import {MOVED[fullname]}", name=fullname)
        return None


if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedFinder())
