"""minigpt2: a character-level GPT-2 you train on your own text and then talk to.

The package imports torch lazily: ``import minigpt2`` is instant, and names such as
``minigpt2.GPT`` load their module on first use.
"""

from __future__ import annotations

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
