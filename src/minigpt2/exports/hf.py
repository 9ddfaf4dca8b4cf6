"""Hugging Face interoperability: export a run as a ``GPT2LMHeadModel`` directory, and import one.

The export is also the proof that our model is GPT-2: ``transformers`` loads it as is and computes
the same logits (``tests/exports/test_hf.py``). The mapping is one to one; the only change is that GPT-2's
``Conv1D`` layers store their weight as (in, out) where our ``nn.Linear`` stores (out, in).

The directory holds ``config.json``, ``model.safetensors``, ``generation_config.json``, a tokenizer
``AutoTokenizer`` loads with its chat template (``hf_tokenizer``), the character vocabulary as
``minigpt2_vocab.json`` (ids are positions in ``tokens``), and a README showing how to chat with it.
``transformers`` is not needed to export or import. Import reads the vocabulary from
``minigpt2_vocab.json`` or ``tokenizer.json``, whichever is there (both: they must agree).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import Tensor

from minigpt2.core.chat import PlayTemplate, default_reply_room, make_template, prompt_budget
from minigpt2.core.config import ModelConfig
from minigpt2.core.model import GPT
from minigpt2.core.tokenizer import BOT_ID, EOT_ID, USER_ID, CharTokenizer
from minigpt2.errors import CheckpointError, ConfigError, UserError
from minigpt2.exports import hf_tokenizer
from minigpt2.storage import checkpoint
from minigpt2.storage.fileio import atomic_write_bytes, publish_dir, read_small_text, temp_dir_for
from minigpt2.storage.outdirs import check_target

VOCAB_FILE = "minigpt2_vocab.json"
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")

README = """# A character-level GPT-2 exported by minigpt2

A `GPT2LMHeadModel` whose tokens are characters: {vocab_size} of them, ids 0-3 being the special tokens
`<|unk|>`, `<|user|>`, `<|bot|>` and `<|eot|>` (the end of a turn, and the eos token). Its context
window is {block} characters.

Chat with it (run from inside this folder, or put the folder's path in place of "."):

```python
from transformers import pipeline
chat = pipeline("text-generation", model=".")
messages = [{{"role": "user", "content": "Hello!"}}]
answer = chat(messages{stop})[0]["generated_text"][-1]
print(answer["content"])
```

Or continue a text, streaming it as it comes:

```python
from transformers import AutoTokenizer, GPT2LMHeadModel, TextStreamer
tok = AutoTokenizer.from_pretrained(".")
model = GPT2LMHeadModel.from_pretrained(".")
ids = tok("To be, or not to be", return_tensors="pt", truncation=True, max_length={prompt_max}).input_ids
model.generate(ids, do_sample=True, streamer=TextStreamer(tok, skip_special_tokens=True))
```

- The prompt and the answer together must fit in the {block}-token window: GPT-2 has no positions
  beyond it. By default generation stops at the end of the turn (`<|eot|>`) or at the window's end
  (`max_length` in generation_config.json); a `max_new_tokens` that reaches past the window makes
  `generate` fail with an index error. `truncation=True` keeps a prompt's end.
- Chats: the chat template renders a conversation as minigpt2 does, {turns}.
  It keeps the newest whole turns that fit in {budget} tokens, so at least {room} are left for the
  answer (`max_new_tokens={room}` is safe); a single message longer than that keeps its end. System
  messages are left out.
- Characters the model never saw: curly quotes, dashes, ellipsis, odd spaces and Windows line ends
  become their plain forms where the model knows those; anything else reads as `<|unk|>`.
- In chat messages, text such as `<|user|>` stays text. `tok(text)`, like every `transformers`
  tokenizer, reads it as the special token: pass `split_special_tokens=True` for text that may hold it.
- `minigpt2 import-hf` reads this folder back (`{vocab_file}` holds the vocabulary).
"""


def _conv1d(name: str) -> bool:
    return name.endswith(CONV1D)


def export_hf(run: Path, out_dir: Path, force: bool = False) -> Path:
    """Write ``run``'s best (or given) checkpoint as a Hugging Face GPT-2 directory.

    ``out_dir`` must be new, empty or an earlier export (replaced whole, atomically); a run is
    never written into, and another non-empty folder only with ``force`` (files added to it)."""
    from safetensors.torch import save

    kind = check_target(out_dir, "export", force=force)
    model, tok, ckpt = checkpoint.load_model(run)
    weights = {
        name: (t.t() if _conv1d(name) else t).contiguous()
        for name, t in model.state_dict().items()
        if name != checkpoint.TIED
    }
    template = ckpt.meta.get("chat_template") or "dialogue"
    make_template(template)  # an unknown template name is refused before anything is written
    vocab = {**tok.to_dict(), "tokens": tok.tokens, "source_step": ckpt.meta.get("step"),
             "chat_template": ckpt.meta.get("chat_template")}  # fmt: skip
    block = model.config.block_size
    files = {
        "model.safetensors": save(weights, metadata={"format": "pt"}),
        "config.json": json.dumps(_hf_config(model.config), indent=1).encode(),
        "generation_config.json": json.dumps(_generation_config(block), indent=1).encode(),
        VOCAB_FILE: json.dumps(vocab, indent=1, ensure_ascii=False).encode(),
        **hf_tokenizer.tokenizer_files(tok, block, template),
        "README.md": _readme(tok, block, template).encode(),
    }
    # A new folder, or an earlier export, appears whole or not at all; a forced write into another
    # folder adds these files to it, each atomically.
    target = out_dir if kind == "other" else temp_dir_for(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    try:
        for name, data in files.items():
            atomic_write_bytes(target / name, data)
        if target != out_dir:
            publish_dir(target, out_dir)
    finally:
        if target != out_dir:
            shutil.rmtree(target, ignore_errors=True)
    return out_dir


def _readme(tok: CharTokenizer, block: int, template: str) -> str:
    room = default_reply_room(block)
    turns, stop = (
        "each turn `<|user|>text<|eot|>` or\n  `<|bot|>text<|eot|>`, the answer opened by `<|bot|>`",
        "",
    )
    if template == "play":
        p = PlayTemplate()
        turns = (f"each turn a speech (`{p.user_name}{p.speaker_end}` on its own line,\n  the text, a blank"
                 f" line), the answer opened by `{p.bot_name}{p.speaker_end}` and ended by the blank line"
                 " (hence\n  `stop_sequence`)")  # fmt: skip
        stop = ', stop_sequence="\\n\\n"'
    # A text to continue keeps its last half-window, so the continuation has the other half.
    return README.format(vocab_size=tok.vocab_size, block=block, room=room, turns=turns, stop=stop,
                         prompt_max=max(1, block // 2), budget=prompt_budget(block),
                         vocab_file=VOCAB_FILE)  # fmt: skip


def _generation_config(block: int) -> dict[str, Any]:
    # Generation stops at any of the ids that stop a minigpt2 chat answer (<|eot|> first, the eos),
    # and by default at the window's end, past which GPT-2 has no position embedding.
    return {"bos_token_id": EOT_ID, "eos_token_id": [EOT_ID, USER_ID, BOT_ID], "pad_token_id": EOT_ID,
            "max_length": block}  # fmt: skip


def _hf_config(c: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": None,  # 4 * n_embd, as GPT-2
        "activation_function": "gelu_new",  # GPT-2's tanh approximation of GELU
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def import_hf(hf_dir: Path, run_dir: Path, force: bool = False) -> Path:
    """Read a GPT-2 directory with a character vocabulary (as ``export_hf`` writes) into ``run_dir/best``.

    ``run_dir`` must be new or empty; with ``force``, an earlier import (a run holding only best/)
    or a folder of another kind; a trained run (last/, config.json) never."""
    _check_import_target(run_dir, force)
    cfg, vocab, raw = _read_hf_dir(hf_dir)
    model_cfg = _model_config(cfg, hf_dir)
    try:
        tok = CharTokenizer.from_dict(vocab)
    except CheckpointError as err:
        raise CheckpointError(f"{hf_dir}: {err}") from None
    if tok.vocab_size != model_cfg.vocab_size:
        raise CheckpointError(f"the vocabulary has {tok.vocab_size} tokens, the model {model_cfg.vocab_size}")
    weights = _our_weights(raw)
    # Before the model is built: config.json's sizes, not the file's, decide its memory.
    problem = checkpoint.shape_mismatch({k: tuple(v.shape) for k, v in weights.items()}, model_cfg)
    if problem:
        raise CheckpointError(f"{hf_dir}/model.safetensors does not match config.json: {problem}")
    model = GPT(model_cfg)
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()[:200]
        raise CheckpointError(f"{hf_dir}: the weights do not match config.json ({first})") from None
    meta = {"step": vocab.get("source_step"), "imported_from": str(hf_dir),
            "chat_template": vocab.get("chat_template") or "dialogue"}  # fmt: skip
    created = not run_dir.exists()
    try:
        checkpoint.save(run_dir / "best", model, tok, meta)
    except BaseException:
        if created:  # a failed import leaves no empty run folder behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir


def _check_import_target(run_dir: Path, force: bool) -> None:
    kind = check_target(run_dir, "run", force=force)
    if kind == "run":
        if (run_dir / "last").exists() or (run_dir / "config.json").exists():
            raise UserError(f"{run_dir} holds a trained run; import into a new --out")
        if not force:
            raise UserError(
                f"{run_dir} already holds a model; choose a new --out, or add --force to replace it"
            )


def _read_hf_dir(hf_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Tensor]]:
    """config.json, the vocabulary (``minigpt2_vocab.json``'s fields, or just the tokens from
    ``tokenizer.json``) and the tensors; every failure is one ``CheckpointError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    has_vocab = (hf_dir / VOCAB_FILE).exists()
    try:
        cfg = json.loads(read_small_text(hf_dir / "config.json"))
        vocab = json.loads(read_small_text(hf_dir / VOCAB_FILE)) if has_vocab else {}
        raw = load_file(hf_dir / "model.safetensors")
    except (OSError, ValueError, SafetensorError) as err:
        raise CheckpointError(
            f"{hf_dir} is not a GPT-2 directory with a minigpt2 vocabulary ({err})"
        ) from None
    if not isinstance(cfg, dict) or not isinstance(vocab, dict):
        raise CheckpointError(f"{hf_dir}: config.json and {VOCAB_FILE} must each hold a JSON object")
    from_tokenizer = hf_tokenizer.read_vocab(hf_dir)
    if from_tokenizer is None and not has_vocab:
        raise CheckpointError(f"{hf_dir} has neither tokenizer.json nor {VOCAB_FILE}: no vocabulary to read")
    if from_tokenizer is not None:
        if has_vocab and CharTokenizer.from_dict(vocab) != from_tokenizer:
            raise CheckpointError(
                f"{hf_dir}: tokenizer.json and {VOCAB_FILE} hold different vocabularies; remove the wrong one"
            )
        vocab = {**vocab, **from_tokenizer.to_dict()}
    return cfg, vocab, raw


def _model_config(cfg: dict[str, Any], hf_dir: Path) -> ModelConfig:
    """Our ``ModelConfig`` from GPT-2's ``config.json``: every field present, an integer (or, for
    dropout, a number) in range; anything else is one clear error."""
    if cfg.get("model_type") != "gpt2" or cfg.get("activation_function", "gelu_new") != "gelu_new":
        raise CheckpointError(f"{hf_dir} is not a GPT-2 model with GELU (tanh) activations")
    ints = {}
    for key in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd"):
        value = cfg.get(key)
        if type(value) is not int or value < 1:  # bool is an int subclass: excluded by `type`
            raise CheckpointError(f"{hf_dir}/config.json: {key} must be a positive integer, got {value!r}")
        ints[key] = value
    dropout = cfg.get("resid_pdrop", 0.0)
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        raise CheckpointError(
            f"{hf_dir}/config.json: resid_pdrop must be a number in [0, 1), got {dropout!r}"
        )
    try:
        return ModelConfig(vocab_size=ints["vocab_size"], block_size=ints["n_positions"],
                           n_layer=ints["n_layer"], n_head=ints["n_head"], n_embd=ints["n_embd"],
                           dropout=float(dropout))  # fmt: skip
    except ConfigError as err:
        raise CheckpointError(f"{hf_dir}/config.json: {err}") from None


def _our_weights(raw: dict[str, Tensor]) -> dict[str, Tensor]:
    """GPT-2's tensor names and layouts -> ours (Conv1D's (in, out) back to (out, in))."""
    weights = {}
    for name, t in raw.items():
        name = name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old GPT-2 checkpoints store their causal mask as a buffer
        weights[name] = t.t().contiguous() if _conv1d(name) else t
    weights.pop(checkpoint.TIED, None)
    return weights
