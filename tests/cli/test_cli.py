"""Tests for ``minigpt2.cli``, run end to end as ``python -m minigpt2`` in subprocesses.

Covers ``--help`` (and that it never imports torch), ``prepare`` on a small text file, ``sample`` on a
run holding a tiny untrained model (seeded output, unseen-character warning, missing and corrupt
runs, bad options) and ``presets``. Each subprocess imports torch once, so these take a few seconds.
Run with ``pytest tests/cli/test_cli.py``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from minigpt2 import data
from minigpt2.core import config
from minigpt2.core.config import SampleConfig
from minigpt2.core.model import GPT
from minigpt2.core.stream import stream_text
from minigpt2.hardware.precision import choose_precision
from minigpt2.storage import checkpoint

Run = Callable[..., subprocess.CompletedProcess[str]]
OneLine = Callable[[subprocess.CompletedProcess[str]], str]


def test_help_lists_the_commands(cli: Run) -> None:
    result = cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("prepare", "sample", "presets"):
        assert command in result.stdout


def test_no_command_is_a_usage_error(cli: Run) -> None:
    result = cli()
    assert result.returncode == 2
    assert "usage:" in result.stderr and "Traceback" not in result.stderr


def test_the_cli_module_does_not_import_torch() -> None:
    code = "import minigpt2.cli, sys; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("argv", [["--help"], ["prepare", "--help"], ["sample", "--help"]])
def test_help_works_without_torch(argv: list[str]) -> None:
    # With torch made unimportable, any `import torch` on the --help path would fail loudly.
    code = f"import sys; sys.modules['torch'] = None; from minigpt2.cli import main; main({argv!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: minigpt2")


@pytest.fixture
def prepared(cli: Run, text_corpus: Path, tmp_path: Path) -> Path:
    out = tmp_path / "data"
    result = cli("prepare", text_corpus, "--out", out, "--block-size", "32")
    assert result.returncode == 0, result.stderr
    meta = data.load(out).meta
    assert f"{meta['train_tokens']:,} train" in result.stdout
    return out


@pytest.fixture
def run_dir(prepared: Path, make_model: Callable[..., GPT], tmp_path: Path) -> Path:
    """A run whose tiny untrained model uses the prepared corpus' vocabulary."""
    tok = data.load(prepared).tokenizer
    run = tmp_path / "run"
    model = make_model(vocab_size=tok.vocab_size, block_size=32, spread=0.3)
    checkpoint.save(run / "best", model, tok, {"step": 0, "data": str(prepared)})
    return run


def test_prepare_writes_the_data_folder(prepared: Path, text_corpus: Path) -> None:
    ds = data.load(prepared)
    text = text_corpus.read_text(encoding="utf-8")
    assert len(ds.train) + len(ds.val) == len(text)
    assert ds.tokenizer.decode([*ds.train.tolist(), *ds.val.tolist()]) == text


def test_sample_is_seeded_and_streams_the_prompt(cli: Run, run_dir: Path) -> None:
    prompt = "Line 7: the"
    args = ["--prompt", prompt, "--seed", "1", "--max-new-tokens", "20", "--device", "cpu", "--dtype", "fp32"]
    first = cli("sample", run_dir, *args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(prompt) and first.stdout.endswith("\n")
    assert first.stderr == ""
    second = cli("sample", run_dir / "best", *args)  # the checkpoint folder itself works too
    assert second.stdout == first.stdout

    # The CLI prints exactly what the library generates with the same settings.
    model, tok, _ = checkpoint.load_model(run_dir)
    cfg = SampleConfig(max_new_tokens=20, seed=1)
    pieces = stream_text(
        model, tok, prompt, cfg, precision=choose_precision(torch.device("cpu"), "fp32"), stop_ids=()
    )
    assert first.stdout == prompt + "".join(pieces) + "\n"


def test_sample_with_default_precision(cli: Run, run_dir: Path) -> None:
    result = cli("sample", run_dir, "--prompt", "The", "--seed", "1", "--max-new-tokens", "20")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The")
    assert len(result.stdout) > len("The\n")


def test_sample_warns_about_unseen_characters(cli: Run, run_dir: Path) -> None:
    prompt = "Caf\u00e9 \u2603 Line"
    result = cli(
        "sample", run_dir, "--prompt", prompt, "--seed", "1", "--max-new-tokens", "10", "--dtype", "fp32"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(prompt)
    warning = result.stderr.strip()
    assert warning.startswith("warning:") and "\n" not in warning
    assert "\u2603" in warning and "\u00e9" in warning and "'L'" not in warning


def test_sample_missing_run(cli: Run, one_line_error: OneLine, tmp_path: Path) -> None:
    line = one_line_error(cli("sample", tmp_path / "no-such-run", "--prompt", "x"))
    assert "no-such-run" in line


def test_sample_corrupt_run(cli: Run, one_line_error: OneLine, run_dir: Path) -> None:
    weights = run_dir / "best" / checkpoint.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    line = one_line_error(cli("sample", run_dir, "--prompt", "x", "--max-new-tokens", "5"))
    assert "corrupt" in line


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--top-p", "-0.5"], "top_p"),
        (["--temperature", "-1"], "temperature"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
    ],
)
def test_sample_rejects_bad_options(
    cli: Run, one_line_error: OneLine, run_dir: Path, flags: list[str], expected: str
) -> None:
    assert expected in one_line_error(cli("sample", run_dir, "--prompt", "x", *flags))


def test_presets_lists_every_preset_with_its_size(cli: Run) -> None:
    result = cli("presets", "--vocab-size", "77")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in config.PRESETS:
        c, t = config.resolve(name, overrides={"vocab_size": 77})
        line = next(line for line in lines if line.split()[0] == name)
        assert line.split()[1:5] == [str(c.n_layer), str(c.n_head), str(c.n_embd), str(c.block_size)]
        assert line.split()[6] == t.optimizer
        if c.n_embd * c.n_layer <= 4096:  # small enough to build here and count
            assert f" {GPT(c).num_params():,}" in line
        assert ("(default)" in line) == (name == config.DEFAULT_PRESET)


def test_export_web_writes_one_page_and_says_so(cli: Run, run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "share" / "chatbot.html"
    done = cli("export", run_dir, "--format", "web", "--out", out, "--dtype", "fp16")
    assert done.returncode == 0, done.stderr
    assert out.is_file() and f"wrote {out}" in done.stdout and "fp16" in done.stdout
    page = out.read_text(encoding="utf-8")
    assert page.lower().startswith("<!doctype html>") and "https://" not in page.split("<script", 1)[0]
    refused = cli("export", run_dir, "--format", "web", "--out", run_dir / "page.html")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
