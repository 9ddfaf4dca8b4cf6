"""Files read safely and written atomically.

Reading (``read_regular``, ``read_small_text``): only a regular file, checked before it is opened
and again once open, so a device or FIFO a user names is refused instead of read for ever.

Writing: a crash at any moment leaves the old version or the new one. The recipe: write to a
temporary name in the same folder, flush and fsync, then ``os.replace`` (atomic on POSIX and
Windows), then fsync the folder so the rename itself survives a power cut.
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

FILE_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
              stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket"}  # fmt: skip


def not_regular(mode: int) -> str | None:
    """What a file of this ``st_mode`` is when it is not a regular file (``"a character device"``)."""
    return None if stat.S_ISREG(mode) else FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


class NotRegularFileError(OSError):
    """A path that is not a regular file (``kind``: "a FIFO (named pipe)", "a folder", ...), refused
    before a byte of it is read. An ``OSError``, so a caller's one-line ``OSError`` message covers it."""

    def __init__(self, path: Path, kind: str) -> None:
        super().__init__(errno.EINVAL, "not a regular file", str(path))
        self.kind = kind


def read_regular(path: Path, limit: int | None = None) -> bytes:
    """The bytes of ``path``, a regular file (or a link to one) that a user or a folder named; with
    ``limit``, at most ``limit + 1`` of them, so that the caller can tell a file over its limit
    without reading it all.

    A device (``/dev/zero`` never ends), FIFO (it waits for a writer) or socket raises
    ``NotRegularFileError`` before any byte is read: it is checked before opening, and again on the
    opened file, which is opened without waiting so that a FIFO put there in between cannot block.
    Other failures are the ``OSError`` the system gave."""
    kind = not_regular(os.stat(path).st_mode)
    if kind is None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as f:
            kind = not_regular(os.fstat(fd).st_mode)
            if kind is None:
                return f.read() if limit is None else f.read(limit + 1)
    raise NotRegularFileError(path, kind)


def read_small_text(path: Path, limit: int = SMALL_FILE_LIMIT) -> str:
    """A settings or metadata file as UTF-8 text, read by ``read_regular``: at most ``limit`` bytes,
    else ``OSError`` (so callers' one-line errors cover a device, a FIFO and a huge file alike)."""
    data = read_regular(path, limit)
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
