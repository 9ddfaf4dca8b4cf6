"""The one exception type for bad input that a user can fix.

Library code raises ``UserError`` (or a subclass) with a single line that names the problem and what
to do about it; the CLI (``minigpt2.cli``) prints that line and exits with status 2, without a
traceback. Anything else that escapes is a bug in minigpt2 and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class UserError(Exception):
    """Bad input: a missing or malformed corpus, checkpoint, option or prompt."""


class DataError(UserError):
    """A corpus that cannot be read or is unusable (missing, empty, not UTF-8, too short)."""


class CheckpointError(UserError):
    """A run or checkpoint directory that is missing, corrupt, or from an unknown format version."""


class ConfigError(UserError):
    """An option or config value out of range, or an unknown preset/config key. ``setting`` names
    the setting at fault, where there is one (the HTTP API reports it as the error's ``param``)."""

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


class WriteError(UserError):
    """An output that cannot be written: a full disk, a read-only folder, a missing permission."""


def names(keys: Iterable[str]) -> str:
    """Keys for a one-line message, sorted: any that is not a plain name quoted and escaped (a key
    read from a file may hold any character, a newline too)."""
    return ", ".join(k if k.isidentifier() else repr(k) for k in sorted(keys))
