"""Shared fixtures: a small tokenizer, tiny models, a small text corpus, a saved run and a CLI runner.

Everything is CPU only and lives under pytest's ``tmp_path``; ``MINIGPT2_CACHE`` points there too, so
no test touches the user's corpus cache. Run the whole suite with ``pytest -x -q`` (add
``-m "not network"`` to skip the one test that downloads the Shakespeare corpus).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from minigpt2.core.config import ModelConfig
from minigpt2.core.model import GPT
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.storage import checkpoint

# A vocabulary of ordinary characters (no combining marks, no "\r"), used by most tests.
ALPHABET = sorted(set(" \n!',-.:;?\"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))
SRC = Path(__file__).resolve().parents[1] / "src"

CliRunner = Callable[..., "subprocess.CompletedProcess[str]"]

# The models here are tiny: extra threads only add synchronisation, and on a busy 2-core machine
# they make every forward pass a hundred times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINIGPT2_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tok() -> CharTokenizer:
    return CharTokenizer(ALPHABET)


@pytest.fixture
def make_model() -> Callable[..., GPT]:
    """Factory for tiny GPTs in eval mode: ``make_model(vocab_size=..., attn_impl=..., spread=...)``.

    ``spread`` > 0 re-draws every weight with that standard deviation, so an untrained model has
    sharp, varied next-token distributions (generation tests need outputs that are not constant).
    """

    def factory(
        vocab_size: int = 50,
        block_size: int = 16,
        n_layer: int = 2,
        n_head: int = 2,
        n_embd: int = 32,
        dropout: float = 0.0,
        attn_impl: str = "sdpa",
        seed: int = 0,
        spread: float = 0.0,
    ) -> GPT:
        torch.manual_seed(seed)
        config = ModelConfig(
            vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
            n_embd=n_embd, dropout=dropout, attn_impl=attn_impl,
        )  # fmt: skip
        model = GPT(config)
        if spread > 0:
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0.0, spread)
        return model.eval()

    return factory


@pytest.fixture
def text_corpus(tmp_path: Path) -> Path:
    """A small UTF-8 text file (about 4 KB), long enough for block_size 32 and val_fraction 0.1."""
    lines = [f"Line {i}: the quick brown fox jumps over the lazy dog, {i * 7 % 13} times." for i in range(60)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def saved_run(tmp_path: Path, tok: CharTokenizer, make_model: Callable[..., GPT]) -> Path:
    """A run directory holding a tiny untrained model as RUN/best."""
    run = tmp_path / "run"
    model = make_model(vocab_size=tok.vocab_size, block_size=32, spread=0.3)
    checkpoint.save(run / "best", model, tok, {"step": 0, "val_loss": None})
    return run


@pytest.fixture
def cli(tmp_path: Path) -> CliRunner:
    """Run ``python -m minigpt2 ARGS`` in a subprocess (cwd ``tmp_path``) and capture its output."""

    def run(*args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
        return subprocess.run(
            [sys.executable, "-m", "minigpt2", *map(str, args)],
            capture_output=True, text=True, encoding="utf-8", cwd=tmp_path, env=env, timeout=timeout,
        )  # fmt: skip

    return run


@pytest.fixture
def one_line_error() -> Callable[[subprocess.CompletedProcess[str]], str]:
    """Checks the CLI's contract for bad input and returns the error line.

    Exit status 2, exactly one stderr line, starting with ``error:``, and no traceback.
    """

    def check(result: subprocess.CompletedProcess[str]) -> str:
        assert result.returncode == 2, (result.returncode, result.stderr)
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("error: "), result.stderr
        return lines[0]

    return check
