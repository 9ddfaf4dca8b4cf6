"""The on-disk checkpoint format, its atomic writes and its safe, validating reads.

A run directory holds two checkpoints kept apart: ``RUN/best`` (lowest validation loss so far) and
``RUN/last`` (the latest state, for resuming). Each checkpoint directory describes itself:

- ``model.safetensors``: the weights (the tied LM head is stored once, as ``transformer.wte.weight``);
  a checkpoint the textbook's own loop wrote (``core/train.py``) holds ``model.pt`` instead, a
  dict of tensors read with ``torch.load(weights_only=True)``;
- ``checkpoint.json``: format and version, model config, tokenizer vocabulary, and metadata (step,
  val loss, training config, data source, chat template);
- ``train_state.pt`` (``last`` only): optimizer, scaler, RNG and sampler state, tensors and plain
  containers only, read back with ``torch.load(weights_only=True)``.

Nothing is ever unpickled. A checkpoint directory is written under a temporary name and renamed
into place (``fileio.publish_dir``), so a crash leaves the previous checkpoint whole; a write that
fails (full disk, read-only folder) is a one-line ``WriteError`` and also leaves it whole.
Tests: ``pytest tests/storage/test_checkpoint.py``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from minigpt2.core import config as cfg
from minigpt2.core.model import GPT
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.errors import CheckpointError, UserError, WriteError
from minigpt2.storage.fileio import atomic_write_bytes, fsync_dir, publish_dir, temp_dir_for
from minigpt2.storage.outdirs import META as META
from minigpt2.storage.outdirs import is_checkpoint, kind_of, run_checkpoint

FORMAT = "minigpt2-checkpoint"
FORMAT_VERSION = 1
WEIGHTS, TRAIN_STATE = "model.safetensors", "train_state.pt"
TEXTBOOK_WEIGHTS = "model.pt"  # what core/train.py writes: the textbook imports no safetensors
TIED = "lm_head.weight"  # the same tensor as transformer.wte.weight, stored once


@dataclass
class Checkpoint:
    """A checkpoint read back: everything needed to rebuild the model, and its metadata."""

    path: Path
    model_config: cfg.ModelConfig
    tokenizer: CharTokenizer
    meta: dict[str, Any]  # step, val_loss, train_config, data, chat_template, ...

    def build_model(self, device: str | torch.device = "cpu") -> GPT:
        """The model with this checkpoint's weights, in eval mode, on ``device``."""
        model = GPT(self.model_config)
        model.load_state_dict(_read_weights(self.path, model), strict=False)
        return model.to(device).eval()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside ``torch.compile`` and DDP wrappers, whose parameter names we save."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def save(
    ckpt_dir: Path,
    model: nn.Module,
    tokenizer: CharTokenizer,
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> None:
    """Write a complete checkpoint directory atomically, replacing any previous one."""
    from safetensors.torch import save as to_safetensors

    model = unwrap(model)
    assert isinstance(model, GPT)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != TIED}
    doc = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_config": cfg.to_dict(model.config),
        "tokenizer": tokenizer.to_dict(),
        **meta,
    }
    tmp = temp_dir_for(ckpt_dir)
    try:
        ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        atomic_write_bytes(tmp / WEIGHTS, to_safetensors(weights))
        if train_state is not None:
            # Through a Python file object: a full disk then raises OSError (given a path, torch
            # writes in C++ and reports it as an obscure RuntimeError).
            with open(tmp / TRAIN_STATE, "wb") as f:
                torch.save(train_state, f)
                f.flush()
                os.fsync(f.fileno())
        atomic_write_bytes(tmp / META, json.dumps(doc, indent=1, ensure_ascii=False).encode())
        fsync_dir(tmp)
        publish_dir(tmp, ckpt_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise WriteError(
                f"cannot write the checkpoint {ckpt_dir}: {err.strerror or err} (the previous one, if"
                " any, is kept); free some space or choose another --out"
            ) from None
        raise


def resolve(path: Path) -> Path:
    """A checkpoint directory from a run directory (its ``best``, else ``last``) or itself."""
    path = Path(path).expanduser()
    if is_checkpoint(path):
        return path
    for name in ("best", "last"):
        found = run_checkpoint(path, name)
        if found is not None:
            return found
    if not path.exists():
        raise CheckpointError(f"no such run or checkpoint: {path}; train one with `minigpt2 train`")
    if kind_of(path) == "run":  # a training that is starting, or stopped before its first evaluation
        raise CheckpointError(
            f"{path} has no checkpoint yet: training writes best/ at its first evaluation (every"
            " eval_interval steps); wait for it, or train it again if its training was killed before"
        )
    raise CheckpointError(
        f"{path} is not a minigpt2 run or checkpoint (no {META} in it, nor in best/ or last/)"
    )


def load(path: Path) -> Checkpoint:
    """Read and validate a checkpoint's metadata (weights are read by ``build_model``)."""
    ckpt_dir = resolve(path)
    try:
        doc = json.loads((ckpt_dir / META).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"corrupt checkpoint: {ckpt_dir / META} is unreadable ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt_dir / META} is not a minigpt2 checkpoint description")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"corrupt checkpoint: {ckpt_dir / META} has no valid version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{ckpt_dir} was written by a newer minigpt2 (format {version}, this one reads up to"
            f" {FORMAT_VERSION}); upgrade minigpt2"
        )
    try:
        model_config = cfg.from_dict(cfg.ModelConfig, doc.get("model_config", {}))
    except UserError as err:
        raise CheckpointError(f"corrupt checkpoint {ckpt_dir}: {err}") from None
    try:
        tokenizer = CharTokenizer.from_dict(doc.get("tokenizer"))
    except CheckpointError as err:
        raise CheckpointError(f"corrupt checkpoint {ckpt_dir}: {err}") from None
    if tokenizer.vocab_size != model_config.vocab_size:
        raise CheckpointError(
            f"corrupt checkpoint {ckpt_dir}: the vocabulary has {tokenizer.vocab_size} tokens but"
            f" the model expects {model_config.vocab_size}"
        )
    # The sizes in the JSON decide how much memory the model takes: they are checked against the
    # weights file's header (no tensor data read) before any caller builds a model from them.
    file = weights_file(ckpt_dir)
    problem = shape_mismatch(weight_shapes(file), model_config)
    if problem:
        raise CheckpointError(f"corrupt checkpoint: {file} does not match {META}: {problem}")
    meta = {k: v for k, v in doc.items() if k not in ("model_config", "tokenizer")}
    return Checkpoint(ckpt_dir, model_config, tokenizer, meta)


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[GPT, CharTokenizer, Checkpoint]:
    """Model (eval mode), tokenizer and checkpoint from a run or checkpoint directory."""
    ckpt = load(path)
    return ckpt.build_model(device), ckpt.tokenizer, ckpt


def load_train_state(ckpt_dir: Path) -> dict[str, Any]:
    """The resume state saved beside ``last``'s weights (tensors and containers only)."""
    file = ckpt_dir / TRAIN_STATE
    if not file.is_file():
        raise CheckpointError(f"{ckpt_dir} has no {TRAIN_STATE}; it cannot be resumed")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure here means a damaged file
        # torch's own message spans many lines and suggests weights_only=False: name the type only.
        raise CheckpointError(
            f"corrupt checkpoint: {file} is unreadable or holds more than tensors"
            f" ({type(err).__name__}); it cannot be resumed"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"corrupt checkpoint: {file} does not hold a training state")
    return state


def weights_file(ckpt_dir: Path) -> Path:
    """The checkpoint's weights: ``model.safetensors``, or the textbook loop's ``model.pt``."""
    textbook = ckpt_dir / TEXTBOOK_WEIGHTS
    return textbook if textbook.is_file() and not (ckpt_dir / WEIGHTS).exists() else ckpt_dir / WEIGHTS


def weight_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, from the safetensors header alone (no tensor data is read; a textbook
    ``model.pt`` is memory-mapped, so its data is not read either)."""
    from safetensors import SafetensorError, safe_open

    if file.name == TEXTBOOK_WEIGHTS:
        return {name: tuple(t.shape) for name, t in _read_textbook_weights(file).items()}
    try:
        with safe_open(file, framework="pt") as f:
            names = f.keys()  # a safe_open handle is not a mapping: it cannot be iterated
            return {name: tuple(f.get_slice(name).get_shape()) for name in names}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"corrupt checkpoint: {file} is missing, truncated or not safetensors ({err})"
        ) from None


def _read_textbook_weights(file: Path) -> dict[str, Tensor]:
    """``model.pt`` as the textbook saves it: a dict of tensors, nothing else (never unpickled code)."""
    try:
        weights = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # any failure here means a damaged file
        raise CheckpointError(
            f"corrupt checkpoint: {file} is unreadable or holds more than tensors ({type(err).__name__})"
        ) from None
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in weights.items()
    ):
        raise CheckpointError(f"corrupt checkpoint: {file} does not hold a dict of named tensors")
    return weights


def shape_mismatch(shapes: dict[str, tuple[int, ...]], config: cfg.ModelConfig) -> str | None:
    """How weights with these names and shapes differ from the model ``config`` describes
    (``"missing transformer.h.2.ln_1.weight"``), or None; ``config``'s model is never allocated."""
    layers = {name.split(".")[2] for name in shapes if name.startswith("transformer.h.")}
    if config.n_layer > len(layers):  # checked first: a huge n_layer would take long even on meta
        first = next(i for i in range(len(layers) + 1) if str(i) not in layers)
        held = f"the weights hold {len(layers)} layers, the config {config.n_layer}"
        return f"missing transformer.h.{first}.* ({held})"
    with torch.device("meta"):  # shapes only: no memory, however large the config says it is
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items() if k != TIED}
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or extra:
        return f"{'missing' if missing else 'unexpected'} {', '.join((missing or extra)[:3])}"
    for name, shape in expected.items():
        if shapes[name] != shape:
            return f"{name} has shape {shapes[name]}, the config says {shape}"
    return None


def _read_weights(ckpt_dir: Path, model: GPT) -> dict[str, Tensor]:
    """The weights file, checked name by name and shape by shape against ``model``, every value finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = weights_file(ckpt_dir)
    try:
        weights = _read_textbook_weights(file) if file.name == TEXTBOOK_WEIGHTS else load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"corrupt checkpoint: {file} is missing, truncated or not safetensors ({err})"
        ) from None
    expected = {k: v.shape for k, v in model.state_dict().items() if k != TIED}
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"corrupt checkpoint: {file} does not match its config"
            f" (missing: {missing[:3]}, unexpected: {extra[:3]})"
        )
    for name, shape in expected.items():
        if weights[name].shape != shape:
            raise CheckpointError(
                f"corrupt checkpoint: {file}: {name} has shape {tuple(weights[name].shape)},"
                f" the config says {tuple(shape)}"
            )
        if not torch.isfinite(weights[name]).all():
            raise CheckpointError(
                f"damaged checkpoint: {file}: {name} holds NaN or infinite values; the weights are"
                " damaged or the training diverged (use another checkpoint, or train again with a lower --lr)"
            )
    return weights
