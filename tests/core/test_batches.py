"""The textbook's batches (``core/batches.py``): windows and their next-character targets, the
bot-only mask, and the loop's ``Batches`` (a fresh draw each step, the same validation windows
every evaluation, accumulation, the masked targets). Run: ``pytest tests/core/test_batches.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_train import prepare
from minigpt2 import data
from minigpt2.core.batches import Batches, bot_mask, get_batch, read_data_folder, windows
from minigpt2.core.tokenizer import BOT_ID, EOT_ID, CharTokenizer


def test_get_batch_shapes_targets_and_reproducibility() -> None:
    series = np.arange(500, dtype=np.uint16)
    x, y = get_batch(series, 6, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (6, 8)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y, x + 1)  # in this series the next token is always the previous plus one
    assert torch.equal(x, x[:, :1] + torch.arange(8))  # contiguous windows
    assert int(x.min()) >= 0 and int(y.max()) < len(series)
    again = get_batch(series, 6, 8, torch.Generator().manual_seed(0))
    other = get_batch(series, 6, 8, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    assert not torch.equal(other[0], x)


def test_get_batch_on_the_shortest_allowed_split() -> None:
    series = np.arange(9, dtype=np.uint16)  # block_size + 1 tokens: exactly one window
    x, y = get_batch(series, 3, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.arange(8).repeat(3, 1)) and torch.equal(y, x + 1)


def test_bot_mask_marks_bot_text_and_its_eot() -> None:
    tok = CharTokenizer(sorted(set("hi there how are you fine ok?")))
    convs = [["hi", "there"], ["how are you", "fine", "ok?"]]
    tokens = np.array([i for c in convs for i in data.encode_dialogue(tok, c)])
    expected = []
    for c in convs:
        for k, turn in enumerate(c):
            is_bot = k % 2 == 1
            expected += [False] + [is_bot] * len(tok.encode(turn)) + [is_bot]  # marker, text, eot
    mask = bot_mask(tokens)
    assert mask.tolist() == expected
    assert not mask[tokens == BOT_ID].any() and mask[tokens == EOT_ID].sum() == 2


def test_windows_mask_targets_outside_the_mask() -> None:
    series = np.arange(40, dtype=np.uint16)
    mask = series % 3 == 0
    x, y = windows(series, np.array([0, 10]), 8, mask)
    assert torch.equal(x[0], torch.arange(8))
    assert y[0].tolist() == [v if v % 3 == 0 else -1 for v in range(1, 9)]


def test_a_prepared_folder_reads_back_as_it_was_written(tmp_path: Path) -> None:
    d = prepare(tmp_path)
    train, val, tok, meta = read_data_folder(d)
    dataset = data.load(d)
    assert np.array_equal(train, dataset.train) and np.array_equal(val, dataset.val)
    assert tok == dataset.tokenizer and meta["kind"] == "text"


@pytest.mark.parametrize("accum", [1, 3])
def test_batches_draw_afresh_each_step_and_evaluate_on_the_same_windows(accum: int) -> None:
    series = np.arange(1000, dtype=np.uint16) % 50
    batches = Batches(series, series[:300], block_size=8, batch_size=4, grad_accum=accum, eval_iters=3)
    first, second = list(batches.passes()), list(batches.passes())
    assert len(first) == accum and all(w == pytest.approx(1 / accum) for _, _, w in first)
    assert all(x.shape == y.shape == (4, 8) for x, y, _ in first)
    assert not torch.equal(first[0][0], second[0][0])  # a new draw for the next step
    val1, val2 = list(batches.val_batches()), list(batches.val_batches())
    assert len(val1) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(val1, val2, strict=True))
    again = Batches(series, series[:300], block_size=8, batch_size=4, grad_accum=accum, eval_iters=3)
    assert torch.equal(next(again.passes())[0], first[0][0])  # the seed decides the draws


def test_batches_on_the_bot_only_count_the_bots_targets() -> None:
    tok = CharTokenizer(sorted(set("hello there friend")))
    convs = [["hello", "there friend"]] * 20
    tokens = np.array([i for c in convs for i in data.encode_dialogue(tok, c)], dtype=np.uint16)
    batches = Batches(tokens, tokens, block_size=8, batch_size=16, bot_only=True)
    _, y, _ = next(batches.passes())
    counted = y[y != -1]
    assert 0 < counted.numel() < y.numel() and BOT_ID not in counted.tolist()
