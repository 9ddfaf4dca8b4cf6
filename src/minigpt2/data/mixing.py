"""A second source mixed into the training split: its exact share, its bounds, and no leak of validation.

``data.prepare(..., mix=SOURCE2, mix_share=s)`` makes SOURCE2 ``s`` of the training characters:

- ``plan``: how many tokens of each the mixed split holds. Every character of both is kept; the
  shorter of the two is repeated and its last copy cut, so the share is the one asked for (to one
  token), not the nearest whole number of copies.
- ``check_share``: a share near 0 or 1 asks for a huge split (``1 - 1e-7`` would repeat a source ten
  million times). The mixed split may hold at most ``MAX_MIX_FACTOR`` times the two sources together
  (and ``MAX_MIX_TOKENS`` in all); a share past that is one ``DataError`` giving the allowed range.
- ``check_distinct``: the validation split must stay unseen. A mix that is the first source, holds
  one of its files, or holds its validation text (a copy under another name) is refused.

Tests: ``pytest tests/data/test_data.py``.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np

from minigpt2.errors import DataError

if TYPE_CHECKING:
    from minigpt2.data import Corpus

MAX_MIX_FACTOR = 100  # the mixed split holds at most this many times the two sources' tokens
MAX_MIX_TOKENS = 2**30  # and at most this many tokens (2 GiB of uint16 ids) in all
PROBE = 200  # characters of validation text looked for in the mix, at its start, middle and end


def plan(n_train: int, n_extra: int, share: float) -> tuple[float, float]:
    """Tokens of the first source's training split and of the mix in the mixed split (before
    rounding: a share near 0 or 1 gives numbers too large to round)."""
    ratio = share / (1 - share)  # mix tokens per training token
    if ratio * n_train >= n_extra:
        return float(n_train), ratio * n_train
    return n_extra / ratio, float(n_extra)


def check_share(n_train: int, n_extra: int, share: float, mix: str) -> None:
    """Refuse a share that would make the mixed split larger than the limit, giving the range allowed."""
    if n_train == 0:
        raise DataError(
            "the first source's training split is empty; give it more text or a smaller --val-fraction"
        )
    limit = min(MAX_MIX_FACTOR * (n_train + n_extra), MAX_MIX_TOKENS)
    source_tokens, mix_tokens = plan(n_train, n_extra, share)
    if source_tokens + mix_tokens > limit:
        low = math.ceil(n_extra / limit * 1e4) / 1e4  # rounded inwards: both ends are allowed
        high = math.floor((limit - n_train) / limit * 1e4) / 1e4
        bound = (f"{MAX_MIX_FACTOR} times the {n_train + n_extra:,} of the two sources"
                 if limit < MAX_MIX_TOKENS else "the most a data folder holds")  # fmt: skip
        raise DataError(
            f"--mix-share {share} would make a training split of {source_tokens + mix_tokens:,.0f}"
            f" tokens, over the {limit:,} allowed ({bound}); with {mix!r} give a share between"
            f" {low:g} and {high:g}"
        )


def mix_in(train: np.ndarray, extra: np.ndarray, share: float) -> tuple[np.ndarray, int]:
    """The training ids followed by ``extra``'s, the shorter repeated and cut so that ``extra`` makes
    up ``share`` of them, and how many of them are ``extra``'s (call ``check_share`` first)."""
    source_tokens, mix_tokens = (round(n) for n in plan(len(train), len(extra), share))
    # np.resize repeats an array whole as often as it fits, then cuts the last copy.
    return np.concatenate([np.resize(train, source_tokens), np.resize(extra, mix_tokens)]), mix_tokens


def _canonical(spec: str) -> str:
    """A named source as one spelling: ``chatterbot`` is ``chatterbot:english``."""
    name, _, lang = spec.partition(":")
    return f"chatterbot:{lang or 'english'}" if name == "chatterbot" else spec


def _file_ids(files: list[str]) -> dict[tuple[int, int], str]:
    """Each file by its device and inode: the same file under any path, link or hard link."""
    ids = {}
    for f in files:
        st = os.stat(f)
        ids[(st.st_dev, st.st_ino)] = f
    return ids


def check_distinct(corpus: Corpus, extra: Corpus) -> None:
    """Refuse a mix that is the first source, or holds one of its files (compared by file, not name)."""
    what = f"the --mix source {extra.source!r}"
    if corpus.files and extra.files:
        own, theirs = _file_ids(corpus.files), _file_ids(extra.files)
        shared = sorted(own.keys() & theirs.keys())
        if shared:
            held = (
                "is that source itself" if own.keys() == theirs.keys() else f"holds its file {own[shared[0]]}"
            )
            raise DataError(
                f"{what} {held} ({corpus.source!r}): its validation text would be trained on; mix in a"
                " different source"
            )
    elif not corpus.files and not extra.files and _canonical(corpus.source) == _canonical(extra.source):
        raise DataError(
            f"{what} is that source itself ({corpus.source!r}): its validation text would be trained"
            " on; mix in a different source"
        )


def check_no_leak(val_text: str, mix_text: str, source: str, mix: str) -> None:
    """Refuse a mix whose text holds the validation text (a copy of the source under another name):
    pieces of ``PROBE`` characters from the start, middle and end of it are looked for."""
    if len(val_text) < PROBE // 4:
        return  # too short to tell a copy from a common phrase
    n = min(PROBE, len(val_text))
    for start in (0, (len(val_text) - n) // 2, len(val_text) - n):
        if val_text[start : start + n] in mix_text:
            raise DataError(
                f"the --mix source {mix!r} holds the validation text of {source!r}: it would be"
                " trained on, and val loss would measure memorised text; mix in a different source"
            )
