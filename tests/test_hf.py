"""Hugging Face export and import: ``transformers`` loads our export as GPT-2 and agrees with us.

Same logits (fp32, 1e-4) on random inputs, the same greedy characters, and an identical round trip
ours -> HF -> ours. Skipped where ``transformers`` is not installed (it is in the dev extras).
Run: ``pytest tests/test_hf.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_model import all_logits
from minigpt2 import checkpoint
from minigpt2.core.config import ModelConfig, SampleConfig
from minigpt2.core.model import GPT
from minigpt2.core.stream import generate_ids
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.errors import CheckpointError
from minigpt2.hf import export_hf, import_hf

transformers = pytest.importorskip("transformers")

TOK = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz .,!?\n")))


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=TOK.vocab_size, block_size=24, n_layer=2, n_head=2, n_embd=32))
    for p in model.parameters():  # spread the weights so outputs are varied and differences show
        torch.nn.init.normal_(p, std=0.3)
    checkpoint.save(tmp_path / "run" / "best", model, TOK, {"step": 7, "chat_template": "play"})
    return tmp_path / "run"


def test_transformers_loads_the_export_and_computes_the_same_logits(run: Path, tmp_path: Path) -> None:
    out = export_hf(run, tmp_path / "hf")
    ours, _, _ = checkpoint.load_model(run)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    idx = torch.randint(0, TOK.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits = all_logits(ours, idx)
        their_logits = theirs(idx).logits
    assert their_logits.shape == ours_logits.shape
    assert torch.allclose(ours_logits, their_logits, atol=1e-4), (ours_logits - their_logits).abs().max()
    assert json.loads((out / "config.json").read_text())["n_positions"] == 24


def test_greedy_generation_gives_the_same_characters(run: Path, tmp_path: Path) -> None:
    out = export_hf(run, tmp_path / "hf")
    ours, _, _ = checkpoint.load_model(run)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    prompt = TOK.encode("hello there")
    mine = list(generate_ids(ours, prompt, SampleConfig(max_new_tokens=12, temperature=0.0), use_cache=False))
    with torch.no_grad():
        generated = theirs.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert generated[0, len(prompt) :].tolist() == mine


def test_round_trip_gives_identical_weights(run: Path, tmp_path: Path) -> None:
    out = export_hf(run, tmp_path / "hf")
    import_hf(out, tmp_path / "back")
    a, tok_a, _ = checkpoint.load_model(run)
    b, tok_b, ckpt = checkpoint.load_model(tmp_path / "back")
    assert tok_a == tok_b and ckpt.meta["chat_template"] == "play"
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_cli_export_and_import_and_bad_input(run: Path, tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "minigpt2", *args], capture_output=True, text=True)

    assert cli("export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")).returncode == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "README.md").is_file()
    assert cli("import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "r2")).returncode == 0
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"not safetensors")
    bad = cli("import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "r3"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    with pytest.raises(CheckpointError):
        import_hf(tmp_path / "nothing", tmp_path / "r4")
