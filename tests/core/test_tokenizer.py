"""Tests for ``minigpt2.core.tokenizer``: the character vocabulary and its policy for unseen text.

Covers the encode/decode round trip, unknown characters (emoji, combining marks, RTL, control
characters) becoming ``<|unk|>`` without raising, the ``NORMALISE`` table, literal special-token
spellings, ``to_dict``/``from_dict``, ``extended``, and hypothesis properties over arbitrary Unicode.
Run with ``pytest tests/core/test_tokenizer.py``.
"""

from __future__ import annotations

import json
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt2.core.tokenizer import (
    BOT_ID,
    EOT_ID,
    NORMALISE,
    SPECIAL_TOKENS,
    UNK,
    UNK_ID,
    USER_ID,
    CharTokenizer,
    prepare_text,
)
from minigpt2.errors import CheckpointError


def test_round_trip_over_the_vocabulary(tok: CharTokenizer) -> None:
    text = "".join(tok.chars) + "".join(reversed(tok.chars)) + "Hello, world!\nIt's fine."
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert UNK_ID not in ids
    assert min(ids) >= len(SPECIAL_TOKENS) and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.unknown_chars(text) == []


def test_ids_are_specials_then_characters(tok: CharTokenizer) -> None:
    assert tok.vocab_size == len(SPECIAL_TOKENS) + len(tok.chars)
    assert tok.tokens[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    assert [tok.encode(c)[0] for c in tok.chars] == list(range(len(SPECIAL_TOKENS), tok.vocab_size))


def test_from_text_is_sorted_distinct_and_canonical() -> None:
    tok = CharTokenizer.from_text(["banana\r\n", "cab\u0065\u0301"])  # CRLF, e + combining acute
    assert tok.chars == sorted(set(tok.chars))
    assert "\r" not in tok.chars and "\u0301" not in tok.chars
    assert set(tok.chars) == set("\nabcné")


@pytest.mark.parametrize(
    ("text", "unknown"),
    [
        ("hi \U0001f600!", ["\U0001f600"]),  # emoji
        (
            "family \U0001f468\u200d\U0001f469\u200d\U0001f467",
            ["\U0001f468", "\u200d", "\U0001f469", "\U0001f467"],
        ),
        ("cafe\u0301", ["é"]),  # combining accent: NFC makes one character, unknown here
        ("q\u0307", ["\u0307"]),  # a combining mark with no precomposed form stays separate
        ("\u05e9\u05dc\u05d5\u05dd world", ["\u05e9", "\u05dc", "\u05d5", "\u05dd"]),  # Hebrew, RTL
        ("\u0645\u0631\u062d\u0628\u0627", ["\u0645", "\u0631", "\u062d", "\u0628", "\u0627"]),  # Arabic
        ("a\u200fb\u202ec", ["\u200f", "\u202e"]),  # RTL mark and override
        ("bell\x07 esc\x1b nul\x00 del\x7f", ["\x07", "\x1b", "\x00", "\x7f"]),  # control characters
        ("lone \ud83d surrogate", ["\ud83d"]),
    ],
)
def test_unknown_characters_become_unk(tok: CharTokenizer, text: str, unknown: list[str]) -> None:
    ids = tok.encode(text)
    assert tok.unknown_chars(text) == unknown
    canonical = prepare_text(text)
    assert len(ids) == len(canonical)
    assert [i == UNK_ID for i in ids] == [c in unknown for c in canonical]
    assert tok.decode(ids) == "".join(UNK if c in unknown else c for c in canonical)


def test_combining_accent_matches_precomposed_character() -> None:
    tok = CharTokenizer(["c", "e", "é"])
    assert tok.encode("e\u0301") == tok.encode("é") == [tok.tokens.index("é")]
    assert tok.unknown_chars("ce\u0301") == []


@pytest.mark.parametrize(
    "curly", ["\u2018", "\u2019", "\u201c", "\u201d", "\u2013", "\u2014", "\u2026", "\u00a0"]
)
def test_normalise_applies_only_when_the_replacement_is_known(curly: str) -> None:
    straight = NORMALISE[curly]
    base = ["a", *sorted(set(straight))]
    with_straight = CharTokenizer(base)
    assert with_straight.encode(f"a{curly}a") == with_straight.encode(f"a{straight}a")
    assert with_straight.decode(with_straight.encode(curly)) == straight
    assert with_straight.unknown_chars(curly) == []

    with_both = CharTokenizer([*base, curly])  # a corpus that really has the curly one keeps it
    assert with_both.encode(curly) == [with_both.tokens.index(curly)]

    without = CharTokenizer(["a"])  # nothing to normalise to: unknown
    assert without.encode(curly) == [UNK_ID]
    assert without.unknown_chars(curly) == [curly]


def test_line_ends_tabs_and_carriage_returns(tok: CharTokenizer) -> None:
    assert tok.encode("a\r\nb") == tok.encode("a\nb")
    assert tok.encode("a\tb") == tok.encode("a b")  # tab -> space when the tab is unknown
    assert tok.encode("a\rb") == tok.encode("ab")  # a lone CR is dropped
    assert CharTokenizer(["\t"]).encode("\t") == [len(SPECIAL_TOKENS)]


@pytest.mark.parametrize("spelling", SPECIAL_TOKENS)
def test_special_token_spellings_encode_as_plain_characters(spelling: str) -> None:
    tok = CharTokenizer.from_text(["<|>abcdefghijklmnopqrstuvwxyz"])
    ids = tok.encode(f"x{spelling}y")
    assert len(ids) == len(spelling) + 2
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)
    assert tok.decode(ids) == f"x{spelling}y"

    letters_only = CharTokenizer.from_text(["abcdefghijklmnopqrstuvwxyz"])
    ids = letters_only.encode(spelling)
    assert len(ids) == len(spelling)
    assert not {USER_ID, BOT_ID, EOT_ID} & set(ids)


def test_decode_special_and_out_of_range_ids(tok: CharTokenizer) -> None:
    a = tok.encode("a")[0]
    assert tok.decode([USER_ID, a, EOT_ID, BOT_ID, a, EOT_ID]) == "<|user|>a<|eot|><|bot|>a<|eot|>"
    assert tok.decode([USER_ID, a, UNK_ID, EOT_ID], skip_special=True) == "a"
    assert tok.decode([a, tok.vocab_size, a]) == f"a{UNK}a"
    assert tok.decode([a, -1, a]) == f"a{UNK}a"  # -1 marks ignored targets; it is no character


def test_dict_round_trip_through_json(tok: CharTokenizer) -> None:
    data = json.loads(json.dumps(tok.to_dict()))
    back = CharTokenizer.from_dict(data)
    assert back == tok
    assert back.tokens == tok.tokens
    assert back.encode("Hello!") == tok.encode("Hello!")


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        "chars",
        {},
        {"type": "bpe", "special_tokens": list(SPECIAL_TOKENS), "chars": ["a"]},
        {"type": "char", "special_tokens": ["<|unk|>"], "chars": ["a"]},
        {"type": "char", "special_tokens": list(SPECIAL_TOKENS)},
        {"type": "char", "special_tokens": list(SPECIAL_TOKENS), "chars": "abc"},
        {"type": "char", "special_tokens": list(SPECIAL_TOKENS), "chars": ["a", 1]},
        {"type": "char", "special_tokens": list(SPECIAL_TOKENS), "chars": ["a", "bc"]},
        {"type": "char", "special_tokens": list(SPECIAL_TOKENS), "chars": ["a", "a"]},
        {"type": "char", "special_tokens": list(SPECIAL_TOKENS), "chars": [""]},
        {"type": "char", "special_tokens": list(SPECIAL_TOKENS), "chars": ["a", "\ud861"]},
    ],
)
def test_malformed_dict_is_a_checkpoint_error(data: object) -> None:
    with pytest.raises(CheckpointError) as info:
        CharTokenizer.from_dict(data)
    assert "\n" not in str(info.value)


def test_constructor_rejects_bad_vocabularies() -> None:
    with pytest.raises(ValueError):
        CharTokenizer(["a", "a"])
    with pytest.raises(ValueError):
        CharTokenizer(["ab"])
    for surrogate in ("\ud800", "\udfff"):  # a lone surrogate: no UTF-8 file can hold the vocabulary
        with pytest.raises(ValueError, match="lone surrogate"):
            CharTokenizer(["a", surrogate])


def test_extended_keeps_ids_and_appends_new_characters(tok: CharTokenizer) -> None:
    bigger = tok.extended(["new text: \u00e9t\u00e9 \u2603 Zz"])
    assert bigger.tokens[: tok.vocab_size] == tok.tokens
    assert bigger.chars[len(tok.chars) :] == ["\u00e9", "\u2603"]
    sample = "Hello, world!"
    assert bigger.encode(sample) == tok.encode(sample)
    assert bigger.encode("\u2603") == [tok.vocab_size + 1]
    assert tok.extended(["abc"]) == tok  # nothing new, nothing added


# Characters that stay themselves next to any neighbour under NFC: no marks (which can compose or
# reorder), no Hangul jamo (which compose algorithmically), no singletons, no "\r" (CRLF -> LF).
def _stable(c: str) -> bool:
    return (
        unicodedata.normalize("NFC", c) == c
        and unicodedata.combining(c) == 0
        and not unicodedata.category(c).startswith("M")
        and not 0x1100 <= ord(c) <= 0x11FF
    )


_VOCAB_CHARS = st.characters(categories=["L", "N", "P", "S", "Zs"], include_characters="\n\t").filter(_stable)


@st.composite
def vocab_and_text(draw: st.DrawFn) -> tuple[CharTokenizer, str]:
    chars = draw(st.lists(_VOCAB_CHARS, min_size=1, max_size=40, unique=True))
    text = draw(st.text(alphabet=st.sampled_from(chars), max_size=200))
    return CharTokenizer(chars), text


@settings(max_examples=200, deadline=None)
@given(vocab_and_text())
def test_property_round_trip_over_vocabulary(case: tuple[CharTokenizer, str]) -> None:
    tok, text = case
    ids = tok.encode(text)
    assert UNK_ID not in ids
    assert tok.decode(ids) == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=200))
def test_property_arbitrary_unicode_never_raises(text: str) -> None:
    tok = CharTokenizer.from_text(["Hello, world! It's a \u201ctest\u201d.\n"])
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert not {USER_ID, BOT_ID, EOT_ID} & set(ids)
    assert (UNK_ID in ids) == bool(tok.unknown_chars(text))
    decoded = tok.decode(ids)
    assert isinstance(decoded, str)
    assert decoded.count(UNK) == ids.count(UNK_ID)
