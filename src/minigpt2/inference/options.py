"""Sampling options by name, as a user types them: ``/set NAME=VALUE`` in the chat and the
notebook's keywords.

``parse_option`` and ``sample_with`` check an option's name and type (an integer for
``max_new_tokens``, not ``1e3``; ``none`` for no seed); ``SampleConfig`` (``core/config.py``) checks
its range, the one rule every front end shares. Each refusal is one ``UserError`` line naming the
option and the problem. Tests: ``pytest tests/core/test_chat.py tests/cli/test_repl.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from minigpt2.core.config import SampleConfig
from minigpt2.errors import UserError

FLOAT_OPTIONS = ("temperature", "top_p", "repetition_penalty")
OPTIONS = tuple(f.name for f in dataclasses.fields(SampleConfig))


def shown(value: Any) -> str:
    """A value as the error line shows it: its repr, cut short (a turn's text may be a megabyte)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_option(name: str, text: str) -> Any:
    """A sampling option's value typed as text: a number, an integer, or ``none`` for ``seed``."""
    if name not in OPTIONS:
        raise UserError(f"unknown option {name!r}; options: {', '.join(OPTIONS)}")
    if name == "seed" and text.strip().lower() == "none":
        return None
    try:
        return float(text) if name in FLOAT_OPTIONS else int(text)
    except ValueError:
        raise UserError(f"{name} needs {_kind(name)}, got {text!r}") from None


def sample_with(sample: SampleConfig, values: dict[str, Any]) -> SampleConfig:
    """``sample`` with ``values`` in place of its own, each checked by name, type and range."""
    for name, value in values.items():
        if name not in OPTIONS:
            raise UserError(f"unknown option {name!r}; options: {', '.join(OPTIONS)}")
        number = isinstance(value, float if name in FLOAT_OPTIONS else int) or (
            name in FLOAT_OPTIONS and isinstance(value, int)
        )
        if isinstance(value, bool) or not (number or (name == "seed" and value is None)):
            raise UserError(f"{name} needs {_kind(name)}, got {shown(value)}")
    return dataclasses.replace(sample, **values)  # SampleConfig checks the ranges


def _kind(name: str) -> str:
    return "a number" if name in FLOAT_OPTIONS else "an integer or none" if name == "seed" else "an integer"
