"""Using a trained run: loading it to generate and the chatbot the front ends talk to (``chatbot``),
sampling options by name (``options``) and conversations kept as files (``conversation``).

``minigpt2.inference.Chatbot`` and ``load_for_inference`` load their module (and torch) on first use,
so the light modules here (``options``) import without it.
"""

from __future__ import annotations

from typing import Any

_LAZY = {"Chatbot", "Loaded", "load_for_inference"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from minigpt2.inference import chatbot

        return getattr(chatbot, name)
    raise AttributeError(f"module 'minigpt2.inference' has no attribute {name!r}")
