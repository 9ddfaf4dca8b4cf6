"""Atomic file and directory writes: a crash at any moment leaves the old version or the new one.

The recipe: write to a temporary name in the same folder, flush and fsync, then ``os.replace``
(atomic on POSIX and Windows), then fsync the folder so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

from minigpt2.errors import WriteError


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


SMALL_FILE_LIMIT = 64 * 2**20  # settings, metadata, vocabularies: far below this


def read_small_text(path: Path, limit: int = SMALL_FILE_LIMIT) -> str:
    """A settings or metadata file as UTF-8 text: a regular file (or a link to one) of at most
    ``limit`` bytes. Anything else raises ``OSError`` before it is read (a device such as
    ``/dev/zero`` never ends, a FIFO waits for a writer), so callers' one-line errors cover it."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit:,} bytes", str(path))
    return data.decode("utf-8")


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (changing it, even for an
    instant, would race with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one.

    The file gets the permissions ``open()`` would give it (0666 less the umask), not the private
    0600 of a temporary file; a symbolic link is written through (its target is replaced), not
    replaced by a file."""
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.exists() and not (path.is_file() or path.is_dir()):  # os.replace would remove a device node
        raise WriteError(f"cannot write {path}: it is a device, FIFO or socket, not a file")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if hasattr(os, "fchmod"):  # POSIX; Windows files have no such bits
                os.fchmod(f.fileno(), 0o666 & ~current_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def temp_dir_for(dest: Path) -> Path:
    """The temporary name a folder is written under before ``publish_dir`` moves it to ``dest``."""
    return dest.with_name(f".{dest.name}.tmp-{os.getpid()}")


def publish_dir(tmp: Path, dest: Path) -> None:
    """Move a fully written folder ``tmp`` into place as ``dest``, replacing any previous one.

    Folders cannot be swapped in one atomic step, so the old one is first renamed to ``dest.old``
    and removed only after the new one is in place. If a crash falls between the two renames,
    ``dest.old`` is still complete, and ``recover_dir`` finds it; if the second rename fails (a full
    disk), the old folder is moved back to ``dest``.
    """
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        if old.exists():  # left by an earlier crash; dest is complete, so old is stale
            shutil.rmtree(old)
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except OSError:
        if old.is_dir() and not dest.exists():
            with contextlib.suppress(OSError):
                os.replace(old, dest)
        raise
    fsync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(dest: Path) -> Path:
    """``dest``, or its complete ``dest.old`` twin if a crash interrupted ``publish_dir``."""
    old = dest.with_name(dest.name + ".old")
    return old if not dest.exists() and old.is_dir() else dest


def clean_up_after_crash(folder: Path) -> list[str]:
    """Tidy what a process killed mid-write left in ``folder``: delete ``.NAME.tmp-PID`` folders
    (``temp_dir_for``), ``.NAME.XXXX.tmp`` files (``atomic_write_bytes``) and a ``NAME.old`` whose
    ``NAME`` is in place; rename a lone ``NAME.old`` back to ``NAME`` (``publish_dir``). Returns the
    names it touched. Call it only while no other process can be writing into ``folder`` (training
    holds ``runstate.RunLock``)."""
    touched = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        dest = p.with_name(p.name.removesuffix(".old"))
        if p.name.startswith(".") and ".tmp-" in p.name and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            p.unlink(missing_ok=True)
        elif p.name.endswith(".old") and p.is_dir() and dest.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.endswith(".old") and p.is_dir() and not dest.exists():
            os.replace(p, dest)
        else:
            continue
        touched.append(p.name)
    return touched
