"""A conversation kept as a file: the JSON of ``/save`` and ``/load``.

A saved conversation is ``{"template": {...}, "history": [{"role": "user", "text": "..."}, ...]}``
(roles ``user`` or ``bot``). The file is whatever path the user typed, so both ends are guarded:

- ``load_history`` reads only a regular file (``/dev/zero`` or a FIFO is refused before a byte is
  read), at most ``MAX_CONVERSATION_BYTES`` + 1 bytes of it, and checks every turn's role and text;
- ``save`` writes only to a regular file or a new one, in an existing folder, atomically, under the
  rule of every single-file write (``outdirs.check_file_target``: never over a device or a folder,
  never into a run, data folder or export); a write the system refuses is worded as where and why.

Each refusal is one ``UserError`` line naming the file and the problem. ``Chatbot.save`` and
``load`` call these; the front ends (the terminal chat, the notebook) call those.
Tests: ``pytest tests/core/test_chat.py tests/cli/test_repl.py``.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

from minigpt2.errors import UserError
from minigpt2.inference.options import shown
from minigpt2.storage.fileio import NotRegularFileError, atomic_write_text, read_regular
from minigpt2.storage.outdirs import check_file_target

ROLES = ("user", "bot")
# A conversation is read whole into memory. 4 MB holds several messages of the largest size the
# server accepts (a 1 MB request body) with room to spare, while the model only ever sees the last
# context window of it; a bigger file is not a conversation this program wrote.
MAX_CONVERSATION_BYTES = 4 * 2**20

# Why the system refused a write, in words that say what to do (errno's own say "No such file or
# directory" when /proc refuses a new file).
WRITE_REFUSALS = {
    errno.ENOENT: "the folder does not accept new files (a virtual file system such as /proc or /sys)",
    errno.EACCES: "no permission to write in that folder",
    errno.EPERM: "the system does not allow writing there",
    errno.EROFS: "the folder is on a read-only file system",
    errno.ENOSPC: "the disk is full",
}


def save(path: str | Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` as JSON to ``path``, replacing a regular file there, or refuse with one line."""
    path = Path(path).expanduser()
    where = f"cannot save the conversation to {path}"
    folder = path.parent
    if not folder.is_dir():
        problem = "does not exist" if not folder.exists() else "is not a folder"
        raise UserError(f"{where}: the folder {folder} {problem}; create it or choose another file")
    # Never over a folder, a device or a FIFO, nor into a run, data folder or export of the project.
    real = check_file_target(path, where)
    try:
        atomic_write_text(real, json.dumps(doc, indent=1, ensure_ascii=False))
    except OSError as err:
        reason = WRITE_REFUSALS.get(err.errno or 0, err.strerror or str(err))
        raise UserError(f"{where}: {reason}; choose a file in a folder of yours") from None


def load_history(path: str | Path) -> list[tuple[str, str]]:
    """The (role, text) turns of a conversation saved with ``save``, checked, or one-line refusal."""
    path = Path(path).expanduser()
    where = f"cannot load the conversation {path}"
    try:
        raw = read_regular(path, MAX_CONVERSATION_BYTES)
    except NotRegularFileError as err:
        raise UserError(f"{where}: it is {err.kind}, not a file; give a file written by /save") from None
    except OSError as err:
        raise UserError(f"{where}: {err.strerror or err}") from None
    if len(raw) > MAX_CONVERSATION_BYTES:
        raise UserError(
            f"{where}: it is larger than {MAX_CONVERSATION_BYTES // 2**20} MB, more than any saved"
            " conversation; give a file written by /save"
        )
    try:
        doc = json.loads(raw.decode("utf-8"))
    except ValueError as err:  # JSON errors and bad UTF-8 alike
        raise UserError(f"{where}: it is not JSON text ({err})") from None
    history = doc.get("history") if isinstance(doc, dict) else None
    if not isinstance(history, list):
        raise UserError(f'{where}: it has no "history" list; give a file written by /save')
    turns = []
    for number, turn in enumerate(history, 1):
        role = turn.get("role") if isinstance(turn, dict) else None
        text = turn.get("text") if isinstance(turn, dict) else None
        if role not in ROLES or not isinstance(text, str):
            raise UserError(
                f"{where}: turn {number} needs a role (user or bot) and a text string, got"
                f" role {shown(role)} and text {shown(text)}"
            )
        turns.append((str(role), text))
    return turns
