"""The character vocabulary: text <-> token ids, special tokens, and the policy for unseen characters.

A char-level model has one token per character it saw in training, plus four reserved tokens:

- ``<|unk|>``  (id 0) stands for any character the model never saw, so no input can crash it;
- ``<|user|>`` (id 1) and ``<|bot|>`` (id 2) open a chat turn;
- ``<|eot|>``  (id 3) ends a turn, and stops generation of the bot's answer.

Special tokens are ids, never text: typing ``<|user|>`` into a prompt encodes those eight
characters one by one, so a user cannot forge a turn marker.

Unseen characters first go through a small, documented normalisation (``NORMALISE``: curly quotes
to straight ones, dashes, ellipsis, non-breaking space, Windows line ends); whatever is still unknown
becomes ``<|unk|>``. ``unknown_chars`` tells the caller which characters those were, so the CLI and
the chat can warn once. Pure Python: no torch, no files. The vocabulary travels as JSON inside every
checkpoint (``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

from minigpt2.errors import CheckpointError

UNK, USER, BOT, EOT = "<|unk|>", "<|user|>", "<|bot|>", "<|eot|>"
SPECIAL_TOKENS: tuple[str, ...] = (UNK, USER, BOT, EOT)
UNK_ID, USER_ID, BOT_ID, EOT_ID = range(len(SPECIAL_TOKENS))

# Applied only to characters missing from the vocabulary, and only when every replacement
# character is in it: a corpus that really contains curly quotes keeps them.
NORMALISE: dict[str, str] = {
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"',
    "\u2013": "-", "\u2014": "--", "\u2212": "-", "\u2026": "...",
    "\u00a0": " ", "\u2009": " ", "\u202f": " ", "\t": " ", "\r": "",
}  # fmt: skip
MAX_VOCAB = 65536  # token ids are stored as uint16


class CharTokenizer:
    """Maps characters to ids and back. Ids 0-3 are the special tokens; characters follow."""

    def __init__(self, chars: Sequence[str]) -> None:
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("chars must be distinct single characters")
        # A lone surrogate (U+D800-U+DFFF) can sit in a Python string but in no UTF-8 text: every
        # write of the vocabulary, a page or an answer would fail on it.
        surrogate = next((c for c in chars if "\ud800" <= c <= "\udfff"), None)
        if surrogate is not None:
            raise ValueError(f"U+{ord(surrogate):04X} is a lone surrogate, not a character text can hold")
        if len(chars) + len(SPECIAL_TOKENS) > MAX_VOCAB:
            raise ValueError(f"vocabulary of {len(chars)} characters exceeds {MAX_VOCAB} tokens")
        self.chars: list[str] = list(chars)
        self.tokens: list[str] = [*SPECIAL_TOKENS, *self.chars]
        self._ids: dict[str, int] = {c: i for i, c in enumerate(self.tokens) if len(c) == 1}

    @classmethod
    def from_text(cls, texts: Iterable[str]) -> CharTokenizer:
        """Build the vocabulary from every distinct character of the corpus, sorted by code point."""
        seen: set[str] = set()
        for text in texts:
            seen.update(prepare_text(text))
        return cls(sorted(seen))

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Never raises: unseen characters are normalised or become ``UNK_ID``."""
        ids: list[int] = []
        for ch in prepare_text(text):
            i = self._ids.get(ch)
            if i is not None:
                ids.append(i)
                continue
            replacement = NORMALISE.get(ch)
            if replacement is not None and all(r in self._ids for r in replacement):
                ids.extend(self._ids[r] for r in replacement)
            else:
                ids.append(UNK_ID)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Ids -> text. Special tokens appear as their spelling unless ``skip_special``; an id outside
        the vocabulary (negative, e.g. an ignored target, or too large) appears as ``<|unk|>``."""
        out = []
        for i in ids:
            if 0 <= i < len(SPECIAL_TOKENS):
                if not skip_special:
                    out.append(self.tokens[i])
            elif len(SPECIAL_TOKENS) <= i < len(self.tokens):
                out.append(self.tokens[i])
            else:
                out.append(UNK)
        return "".join(out)

    def decode_each(self, ids: Iterable[int]) -> list[str]:
        """Each id's own text (special tokens by their spelling)."""
        return [self.decode([i]) for i in ids]

    def unknown_chars(self, text: str) -> list[str]:
        """The distinct characters of ``text`` that will encode as ``<|unk|>``, in order of appearance."""
        unknown: dict[str, None] = {}
        for ch in prepare_text(text):
            if ch in self._ids:
                continue
            replacement = NORMALISE.get(ch)
            if replacement is None or not all(r in self._ids for r in replacement):
                unknown[ch] = None
        return list(unknown)

    def extended(self, texts: Iterable[str]) -> CharTokenizer:
        """A tokenizer with this vocabulary plus any new characters of ``texts`` appended.

        Existing ids keep their meaning, so a trained model's embedding rows stay valid
        (fine-tuning on a corpus with new characters only adds rows).
        """
        known = set(self.chars)
        new = sorted({c for t in texts for c in prepare_text(t)} - known)
        return CharTokenizer(self.chars + new)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "char", "special_tokens": list(SPECIAL_TOKENS), "chars": self.chars}

    @classmethod
    def from_dict(cls, data: Any) -> CharTokenizer:
        """Rebuild from ``to_dict`` output; a malformed vocabulary is a ``CheckpointError``."""
        if (
            not isinstance(data, dict)
            or data.get("type") != "char"
            or data.get("special_tokens") != list(SPECIAL_TOKENS)
            or not isinstance(data.get("chars"), list)
            or not all(isinstance(c, str) for c in data["chars"])
        ):
            raise CheckpointError("the tokenizer vocabulary is missing or malformed")
        try:
            return cls(data["chars"])
        except ValueError as err:
            raise CheckpointError(f"the tokenizer vocabulary is malformed: {err}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def prepare_text(text: str) -> str:
    """Canonical form of text before it meets the vocabulary: NFC Unicode and ``\\n`` line ends.

    NFC makes an accented letter typed as letter + combining accent equal to the precomposed
    character found in most corpora.
    """
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n"))
