"""Tests for ``minigpt2.storage.checkpoint``: saving, resolving and safely loading checkpoint directories.

Covers the save/load round trip, run-directory resolution (best, last, best.old after a crash), every
kind of corruption raising a one-line ``CheckpointError`` (a pickle disguised as safetensors must not
run), ``train_state.pt`` and the ``_orig_mod.`` prefix of compiled models. Tiny CPU models only.
Run with ``pytest tests/storage/test_checkpoint.py``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from helpers_train import main, one_error_line, train_args
from helpers_train import prepare as prepare_data
from minigpt2.core.model import GPT
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.errors import CheckpointError
from minigpt2.storage import checkpoint

Factory = Callable[..., GPT]


@pytest.fixture
def model(make_model: Factory, tok: CharTokenizer) -> GPT:
    return make_model(vocab_size=tok.vocab_size, block_size=16, spread=0.1)


@pytest.fixture
def ckpt(tmp_path: Path, model: GPT, tok: CharTokenizer) -> Path:
    path = tmp_path / "run" / "best"
    checkpoint.save(path, model, tok, {"step": 7, "val_loss": 1.25})
    return path


def _raises_one_line(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_model(path)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def _edit_meta(ckpt: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads((ckpt / checkpoint.META).read_text(encoding="utf-8"))
    edit(doc)
    (ckpt / checkpoint.META).write_text(json.dumps(doc), encoding="utf-8")


def test_save_then_load_round_trip(ckpt: Path, model: GPT, tok: CharTokenizer) -> None:
    loaded, loaded_tok, info = checkpoint.load_model(ckpt)
    assert loaded_tok == tok
    assert loaded.config == model.config
    assert not loaded.training
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, restored[name]), name
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied after loading
    assert info.meta["step"] == 7 and info.meta["val_loss"] == 1.25
    assert info.meta["version"] == checkpoint.FORMAT_VERSION
    idx = torch.randint(tok.vocab_size, (1, 10))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0])


def test_the_tied_head_is_stored_once(ckpt: Path) -> None:
    names = set(load_file(ckpt / checkpoint.WEIGHTS))
    assert checkpoint.TIED not in names
    assert "transformer.wte.weight" in names
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([checkpoint.WEIGHTS, checkpoint.META])


def test_saving_again_replaces_the_checkpoint(ckpt: Path, make_model: Factory, tok: CharTokenizer) -> None:
    other = make_model(vocab_size=tok.vocab_size, block_size=16, seed=99)
    checkpoint.save(ckpt, other, tok, {"step": 8})
    loaded, _, info = checkpoint.load_model(ckpt)
    assert info.meta["step"] == 8
    assert torch.equal(loaded.transformer.wte.weight, other.transformer.wte.weight)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["best"]  # no temporary or .old leftovers


def test_resolve_run_directory(tmp_path: Path, model: GPT, tok: CharTokenizer) -> None:
    run = tmp_path / "run"
    checkpoint.save(run / "last", model, tok, {"step": 2})
    assert checkpoint.resolve(run) == run / "last"  # no best yet: falls back to last
    checkpoint.save(run / "best", model, tok, {"step": 1})
    assert checkpoint.resolve(run) == run / "best"
    assert checkpoint.resolve(run / "last") == run / "last"
    assert checkpoint.load(run).meta["step"] == 1


def test_resolve_finds_best_old_after_a_crash_between_renames(ckpt: Path) -> None:
    run = ckpt.parent
    os.replace(ckpt, run / "best.old")  # publish_dir moved best aside, then the process died
    assert checkpoint.resolve(run) == run / "best.old"
    loaded, _, info = checkpoint.load_model(run)
    assert info.meta["step"] == 7 and info.path == run / "best.old"
    assert loaded.config.vocab_size == info.tokenizer.vocab_size


def test_missing_run_and_non_checkpoint_folders(tmp_path: Path) -> None:
    assert "no such run" in _raises_one_line(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "not a minigpt2 run" in _raises_one_line(tmp_path / "empty")


def test_truncated_weights(ckpt: Path) -> None:
    weights = ckpt / checkpoint.WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "model.safetensors" in _raises_one_line(ckpt)


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"not safetensors at all, just text"])
def test_garbage_weights(ckpt: Path, content: bytes) -> None:
    (ckpt / checkpoint.WEIGHTS).write_bytes(content)
    _raises_one_line(ckpt)


def test_missing_weights(ckpt: Path) -> None:
    (ckpt / checkpoint.WEIGHTS).unlink()
    _raises_one_line(ckpt)


class _Exploit:
    """Unpickling this creates the marker file: proof that the pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_pickle_posing_as_weights_is_never_executed(ckpt: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"transformer.wte.weight": _Exploit(marker)})
    pickle.loads(payload)  # sanity check: the payload does work when unpickled
    assert marker.exists()
    marker.unlink()
    (ckpt / checkpoint.WEIGHTS).write_bytes(payload)
    _raises_one_line(ckpt)
    assert not marker.exists()


def test_a_pickle_in_train_state_is_never_executed(ckpt: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "evil": _Exploit(marker)}, ckpt / checkpoint.TRAIN_STATE)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_train_state(ckpt)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_invalid_json(ckpt: Path) -> None:
    (ckpt / checkpoint.META).write_text('{"format": "minigpt2-checkpoint", ', encoding="utf-8")
    assert "checkpoint.json" in _raises_one_line(ckpt)


def test_meta_that_is_not_utf8(ckpt: Path) -> None:
    (ckpt / checkpoint.META).write_bytes(b"\xff\xfe{}")
    _raises_one_line(ckpt)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda d: d.pop("format"), id="no-format"),
        pytest.param(lambda d: d.update(format="something-else"), id="wrong-format"),
        pytest.param(lambda d: d.pop("version"), id="no-version"),
        pytest.param(lambda d: d.update(version="1"), id="version-string"),
        pytest.param(lambda d: d.pop("model_config"), id="no-model-config"),
        pytest.param(lambda d: d.update(model_config=[1, 2]), id="model-config-list"),
        pytest.param(lambda d: d.pop("tokenizer"), id="no-tokenizer"),
        pytest.param(lambda d: d["model_config"].pop("n_embd"), id="missing-field"),
        pytest.param(lambda d: d["model_config"].update(n_layer="six"), id="n_layer-six"),
        pytest.param(lambda d: d["model_config"].update(n_head=2.0), id="n_head-float"),
        pytest.param(lambda d: d["model_config"].update(dropout="0.1"), id="dropout-string"),
        pytest.param(lambda d: d["model_config"].update(n_layer=0), id="n_layer-zero"),
        pytest.param(lambda d: d["model_config"].update(attn_impl="flash"), id="bad-attn-impl"),
        pytest.param(lambda d: d["model_config"].update(surprise=1), id="unknown-field"),
        pytest.param(lambda d: d["tokenizer"].update(chars="abc"), id="chars-string"),
        pytest.param(lambda d: d["tokenizer"]["chars"].pop(), id="vocab-vs-config"),
    ],
)
def test_malformed_metadata(ckpt: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    _edit_meta(ckpt, edit)
    _raises_one_line(ckpt)


def test_vocab_size_that_does_not_match_the_weights(ckpt: Path) -> None:
    def grow(doc: dict[str, Any]) -> None:  # config and vocabulary agree, the weights do not
        doc["tokenizer"]["chars"].append("\u2603")
        doc["model_config"]["vocab_size"] += 1

    _edit_meta(ckpt, grow)
    with pytest.raises(CheckpointError, match="shape"):
        checkpoint.load(ckpt)  # the description alone is consistent; the weights' header is not


def test_weights_with_missing_or_extra_tensors(ckpt: Path) -> None:
    from safetensors.torch import save_file

    weights = load_file(ckpt / checkpoint.WEIGHTS)
    weights["transformer.h.9.attn.c_attn.weight"] = weights.pop("transformer.h.1.attn.c_attn.weight")
    save_file(weights, ckpt / checkpoint.WEIGHTS)
    assert "does not match" in _raises_one_line(ckpt)


def test_future_format_version(ckpt: Path) -> None:
    _edit_meta(ckpt, lambda d: d.update(version=checkpoint.FORMAT_VERSION + 1))
    assert "newer minigpt2" in _raises_one_line(ckpt)


def test_train_state_round_trip(tmp_path: Path, model: GPT, tok: CharTokenizer) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _, loss = model(torch.zeros(1, 4, dtype=torch.long), targets=torch.ones(1, 4, dtype=torch.long))
    assert loss is not None
    loss.backward()
    optimizer.step()
    gen = torch.Generator().manual_seed(5)
    state = {
        "step": 3,
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "sampler": gen.get_state()},
        "history": [1.5, 1.25],
    }
    last = tmp_path / "run" / "last"
    checkpoint.save(last, model, tok, {"step": 3}, train_state=state)
    back = checkpoint.load_train_state(last)
    assert back["step"] == 3 and back["history"] == [1.5, 1.25]
    assert torch.equal(back["rng"]["sampler"], gen.get_state())
    restored = torch.optim.AdamW(model.parameters(), lr=1e-3)
    restored.load_state_dict(back["optimizer"])
    for a, b in zip(optimizer.state.values(), restored.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"])


def test_train_state_missing_or_damaged(ckpt: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        checkpoint.load_train_state(ckpt)
    (ckpt / checkpoint.TRAIN_STATE).write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError):
        checkpoint.load_train_state(ckpt)


class _Compiled(nn.Module):
    """Stands in for torch.compile's OptimizedModule: the real model lives in ``_orig_mod``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner


class _Parallel(nn.Module):
    """Stands in for DistributedDataParallel: the real model lives in ``module``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner


def test_wrapped_models_are_saved_without_prefixes(tmp_path: Path, model: GPT, tok: CharTokenizer) -> None:
    wrapped = _Parallel(_Compiled(model))
    assert all(k.startswith("module._orig_mod.") for k in wrapped.state_dict())
    assert checkpoint.unwrap(wrapped) is model
    path = tmp_path / "wrapped"
    checkpoint.save(path, wrapped, tok, {})
    names = set(load_file(path / checkpoint.WEIGHTS))
    assert names == set(model.state_dict()) - {checkpoint.TIED}
    loaded, _, _ = checkpoint.load_model(path)
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)


def test_failed_save_leaves_the_previous_checkpoint(ckpt: Path, model: GPT, tok: CharTokenizer) -> None:
    with pytest.raises(TypeError):  # metadata that is not JSON: fails after the weights are written
        checkpoint.save(ckpt, model, tok, {"step": 9, "bad": object()})
    assert checkpoint.load(ckpt).meta["step"] == 7
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["best"]
    shutil.rmtree(ckpt)
    with pytest.raises(CheckpointError):
        checkpoint.load(ckpt.parent)


# --- a config that does not describe its weights, a vocabulary text cannot hold, NaN weights --------------

GIANT = {"n_embd": 65536, "n_layer": 64, "n_head": 2, "block_size": 1048576}  # 256 GiB if allocated


def _reading_commands(run: Path, tmp_path: Path) -> list[list[object]]:
    """Every command that reads a checkpoint, each writing (if anything) under ``tmp_path/out-*``."""
    d = prepare_data(tmp_path)
    return [
        ["sample", run, "--prompt", "a", "--max-new-tokens", 3, "--device", "cpu"],
        ["chat", run, "--prompt", "a", "--max-new-tokens", 3, "--device", "cpu"],
        ["eval", run, "--data", d, "--device", "cpu", "--max-windows", 2],
        ["export", run, "--out", tmp_path / "out-hf"],
        ["export", run, "--format", "web", "--out", tmp_path / "out-web.html"],
        train_args(d, tmp_path / "out-run", "--init-from", run, "--max-iters", 1),
    ]


@pytest.mark.parametrize("sizes", [GIANT, {"n_embd": 64}], ids=["256-GiB", "fits-in-memory"])
def test_sizes_that_do_not_match_the_weights_are_refused_before_a_model_is_built(
    ckpt: Path, sizes: dict[str, int]
) -> None:
    _edit_meta(ckpt, lambda d: d["model_config"].update(sizes))
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(ckpt)  # reads the weights' header only, and builds no model
    message = str(info.value)
    assert f"{ckpt / checkpoint.WEIGHTS} does not match" in message and "transformer." in message
    assert "\n" not in message


def test_every_command_refuses_a_config_far_larger_than_its_weights(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit_meta(ckpt, lambda d: d["model_config"].update(GIANT))
    for argv in _reading_commands(ckpt.parent, tmp_path):
        line = one_error_line(*main(capsys, *argv)[::2])
        assert "model.safetensors does not match checkpoint.json: missing transformer.h.2" in line, argv
    assert not list(tmp_path.glob("out-*"))


def test_a_vocabulary_with_a_lone_surrogate_is_refused_when_read(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit_meta(ckpt, lambda d: d["tokenizer"]["chars"].__setitem__(-1, "\ud861"))
    assert "U+D861 is a lone surrogate" in _raises_one_line(ckpt)
    for argv in _reading_commands(ckpt.parent, tmp_path):
        assert "lone surrogate" in one_error_line(*main(capsys, *argv)[::2]), argv
    assert not list(tmp_path.glob("out-*"))


def test_non_finite_weights_are_refused_by_every_command(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import save_file

    weights = load_file(ckpt / checkpoint.WEIGHTS)
    weights["transformer.h.1.mlp.c_fc.weight"][3, 5] = float("nan")
    save_file(weights, ckpt / checkpoint.WEIGHTS)
    message = _raises_one_line(ckpt)
    assert "transformer.h.1.mlp.c_fc.weight holds NaN or infinite values" in message
    assert "damaged or the training diverged" in message
    for argv in _reading_commands(ckpt.parent, tmp_path):
        assert "damaged or the training diverged" in one_error_line(*main(capsys, *argv)[::2]), argv
    assert not list(tmp_path.glob("out-*"))


def test_eval_refuses_a_loss_that_is_not_a_number(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import save_file

    weights = load_file(ckpt / checkpoint.WEIGHTS)
    weights["transformer.wte.weight"].fill_(1e30)  # finite, but LayerNorm's variance overflows
    save_file(weights, ckpt / checkpoint.WEIGHTS)
    d = prepare_data(tmp_path)
    line = one_error_line(*main(capsys, "eval", ckpt.parent, "--data", d, "--device", "cpu")[::2])
    assert "the val loss is nan" in line and "damaged or its training diverged" in line
