"""Atomic file and directory writes: a crash at any moment leaves the old version or the new one.

The recipe: write to a temporary name in the same folder, flush and fsync, then ``os.replace``
(atomic on POSIX and Windows), then fsync the folder so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Persist a folder's entries (renames); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def publish_dir(tmp: Path, dest: Path) -> None:
    """Move a fully written folder ``tmp`` into place as ``dest``, replacing any previous one.

    Folders cannot be swapped in one atomic step, so the old one is first renamed to ``dest.old``
    and removed only after the new one is in place. If a crash falls between the two renames,
    ``dest.old`` is still complete, and ``recover_dir`` finds it.
    """
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        if old.exists():  # left by an earlier crash; dest is complete, so old is stale
            shutil.rmtree(old)
        os.replace(dest, old)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(dest: Path) -> Path:
    """``dest``, or its complete ``dest.old`` twin if a crash interrupted ``publish_dir``."""
    old = dest.with_name(dest.name + ".old")
    return old if not dest.exists() and old.is_dir() else dest
