"""Hugging Face interoperability: export a run as a ``GPT2LMHeadModel`` directory, and import one.

The export is also the proof that our model is GPT-2: ``transformers`` loads it as is and computes
the same logits (``tests/test_hf.py``). The mapping is one to one; the only change is that GPT-2's
``Conv1D`` layers store their weight as (in, out) where our ``nn.Linear`` stores (out, in).

The directory holds ``config.json``, ``model.safetensors``, ``generation_config.json``, the
character vocabulary as ``minigpt2_vocab.json`` (ids are positions in ``tokens``), and a README
showing how to encode and decode with it. ``transformers`` is not needed to export or import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from minigpt2 import checkpoint
from minigpt2.core.config import ModelConfig
from minigpt2.core.model import GPT
from minigpt2.core.tokenizer import EOT_ID, CharTokenizer
from minigpt2.errors import CheckpointError
from minigpt2.fileio import atomic_write_bytes, atomic_write_text

VOCAB_FILE = "minigpt2_vocab.json"
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")

README = """# A character-level GPT-2 exported by minigpt2

```python
import json, torch
from transformers import GPT2LMHeadModel

model = GPT2LMHeadModel.from_pretrained("{dir}")
tokens = json.load(open("{dir}/{vocab}"))["tokens"]  # id -> character; ids 0-3 are special tokens
ids = {{t: i for i, t in enumerate(tokens) if len(t) == 1}}
prompt = torch.tensor([[ids[c] for c in "Hello"]])
out = model.generate(prompt, max_new_tokens=50, do_sample=False)
print("".join(tokens[i] if i >= 4 else "" for i in out[0].tolist()))
```
"""


def _conv1d(name: str) -> bool:
    return name.endswith(CONV1D)


def export_hf(run: Path, out_dir: Path) -> Path:
    """Write ``run``'s best (or given) checkpoint as a Hugging Face GPT-2 directory."""
    from safetensors.torch import save

    model, tok, ckpt = checkpoint.load_model(run)
    c = model.config
    weights = {
        name: (t.t() if _conv1d(name) else t).contiguous()
        for name, t in model.state_dict().items()
        if name != checkpoint.TIED
    }
    hf_config = {
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
    generation = {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "model.safetensors", save(weights, metadata={"format": "pt"}))
    atomic_write_text(out_dir / "config.json", json.dumps(hf_config, indent=1))
    atomic_write_text(out_dir / "generation_config.json", json.dumps(generation, indent=1))
    vocab = {**tok.to_dict(), "tokens": tok.tokens, "source_step": ckpt.meta.get("step"),
             "chat_template": ckpt.meta.get("chat_template")}  # fmt: skip
    atomic_write_text(out_dir / VOCAB_FILE, json.dumps(vocab, indent=1, ensure_ascii=False))
    atomic_write_text(out_dir / "README.md", README.format(dir=out_dir, vocab=VOCAB_FILE))
    return out_dir


def import_hf(hf_dir: Path, run_dir: Path) -> Path:
    """Read a GPT-2 directory with a character vocabulary (as ``export_hf`` writes) into ``run_dir/best``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        cfg: dict[str, Any] = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
        vocab = json.loads((hf_dir / VOCAB_FILE).read_text(encoding="utf-8"))
        raw = load_file(hf_dir / "model.safetensors")
    except (OSError, ValueError, SafetensorError) as err:
        raise CheckpointError(
            f"{hf_dir} is not a GPT-2 directory with a minigpt2 vocabulary ({err})"
        ) from None
    if cfg.get("model_type") != "gpt2" or cfg.get("activation_function", "gelu_new") != "gelu_new":
        raise CheckpointError(f"{hf_dir} is not a GPT-2 model with GELU (tanh) activations")
    tok = CharTokenizer.from_dict(vocab)
    model_cfg = ModelConfig(vocab_size=int(cfg["vocab_size"]), block_size=int(cfg["n_positions"]),
                            n_layer=int(cfg["n_layer"]), n_head=int(cfg["n_head"]), n_embd=int(cfg["n_embd"]),
                            dropout=float(cfg.get("resid_pdrop", 0.0)))  # fmt: skip
    if tok.vocab_size != model_cfg.vocab_size:
        raise CheckpointError(f"the vocabulary has {tok.vocab_size} tokens, the model {model_cfg.vocab_size}")
    weights = {}
    for name, t in raw.items():
        name = name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old GPT-2 checkpoints store their causal mask as a buffer
        weights[name] = t.t().contiguous() if _conv1d(name) else t
    model = GPT(model_cfg)
    weights.pop(checkpoint.TIED, None)
    missing = set(model.state_dict()) - set(weights) - {checkpoint.TIED}
    if missing:
        raise CheckpointError(f"{hf_dir}/model.safetensors lacks {sorted(missing)[:3]}")
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as err:
        raise CheckpointError(f"{hf_dir}: the weights do not match config.json ({str(err)[:200]})") from None
    meta = {"step": vocab.get("source_step"), "imported_from": str(hf_dir),
            "chat_template": vocab.get("chat_template") or "dialogue"}  # fmt: skip
    checkpoint.save(run_dir / "best", model, tok, meta)
    return run_dir
