"""Tests for ``minigpt2.core.model``: GPT-2's shapes, initialisation, weight tying, attention and KV cache.

Covers output shapes, the initial loss (about ln V), the tied LM head, manual vs sdpa attention,
cached vs full forward passes, the context-window limit, GPT-2's residual-projection init and
Hugging Face parameter names. Tiny CPU models only. Run with ``pytest tests/core/test_model.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from helpers_model import all_logits
from minigpt2.core.config import ModelConfig
from minigpt2.core.model import GPT, KVCache, causal_mask

Factory = Callable[..., GPT]


def test_output_shapes_and_loss(make_model: Factory) -> None:
    model = make_model(vocab_size=50, block_size=16)
    idx = torch.randint(50, (3, 11))
    logits, loss = model(idx)  # inference: the last position only
    assert logits.shape == (3, 1, 50)
    assert loss is None
    logits, loss = model(idx, targets=idx)
    assert logits.shape == (3, 11, 50)
    assert loss is not None and loss.ndim == 0 and torch.isfinite(loss)


def test_inference_logits_are_the_last_position_of_the_full_ones(make_model: Factory) -> None:
    model = make_model(spread=0.2)
    idx = torch.randint(50, (2, 9))
    torch.testing.assert_close(model(idx)[0], all_logits(model, idx)[:, -1:], atol=1e-6, rtol=1e-6)


def test_initial_loss_is_near_uniform(make_model: Factory) -> None:
    for vocab_size in (50, 300):
        model = make_model(vocab_size=vocab_size, block_size=16, seed=vocab_size)
        gen = torch.Generator().manual_seed(1)
        idx = torch.randint(vocab_size, (8, 16), generator=gen)
        targets = torch.randint(vocab_size, (8, 16), generator=gen)
        _, loss = model(idx, targets=targets)
        assert loss is not None
        assert abs(loss.item() - math.log(vocab_size)) < 0.3


def test_ignored_targets_are_left_out_of_the_loss(make_model: Factory) -> None:
    model = make_model()
    idx = torch.randint(50, (2, 8))
    targets = torch.randint(50, (2, 8))
    masked = targets.clone()
    masked[:, :4] = -1
    logits = all_logits(model, idx)
    _, loss = model(idx, targets=masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 50), targets[:, 4:].reshape(-1))
    assert loss is not None
    torch.testing.assert_close(loss, expected)


def test_lm_head_is_tied_to_token_embedding(make_model: Factory) -> None:
    model = make_model()
    wte = model.transformer.wte.weight
    assert model.lm_head.weight is wte
    assert model.lm_head.weight.data_ptr() == wte.data_ptr()
    with torch.no_grad():
        wte[7, 3] += 1.0
    assert model.lm_head.weight[7, 3] == wte[7, 3]
    # Counted once: the parameter total does not include a second V x C matrix.
    stored = sum(v.numel() for k, v in model.state_dict().items() if k != "lm_head.weight")
    assert model.num_params() == stored
    assert model.num_params(non_embedding=True) == model.num_params() - model.transformer.wpe.weight.numel()


def _pair(make_model: Factory, **kwargs: object) -> tuple[GPT, GPT]:
    """The same weights under the manual and the sdpa attention."""
    manual = make_model(attn_impl="manual", **kwargs)
    sdpa = make_model(attn_impl="sdpa", seed=123, **kwargs)
    sdpa.load_state_dict(manual.state_dict())
    return manual, sdpa


@pytest.mark.parametrize("train_mode", [False, True])
def test_manual_and_sdpa_attention_agree(make_model: Factory, train_mode: bool) -> None:
    manual, sdpa = _pair(make_model, spread=0.2)
    manual.train(train_mode)
    sdpa.train(train_mode)
    idx = torch.randint(50, (2, 16))
    torch.testing.assert_close(all_logits(manual, idx), all_logits(sdpa, idx), atol=1e-5, rtol=1e-5)


def test_causal_mask_shape_and_offset() -> None:
    mask = causal_mask(2, 5, torch.device("cpu"))
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert torch.equal(causal_mask(4, 4, torch.device("cpu")), torch.ones(4, 4, dtype=torch.bool).tril())


def test_future_tokens_do_not_change_past_logits(make_model: Factory) -> None:
    model = make_model(spread=0.2)
    idx = torch.randint(50, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50
    torch.testing.assert_close(all_logits(model, idx)[:, :8], all_logits(model, changed)[:, :8])
    assert not torch.allclose(all_logits(model, idx)[:, 8:], all_logits(model, changed)[:, 8:])


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
@pytest.mark.parametrize("prefill", [1, 5, 16])
def test_kv_cache_matches_full_forward(make_model: Factory, attn_impl: str, prefill: int) -> None:
    model = make_model(attn_impl=attn_impl, block_size=16, spread=0.2)
    idx = torch.randint(50, (2, 16))
    full = all_logits(model, idx)
    cache = KVCache(model.config, batch_size=2)
    pieces = [all_logits(model, idx[:, :prefill], cache)]
    for t in range(prefill, 16):
        pieces.append(all_logits(model, idx[:, t : t + 1], cache))
    assert cache.pos == 16
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_kv_cache_chunks_and_reset(make_model: Factory, attn_impl: str) -> None:
    model = make_model(attn_impl=attn_impl, spread=0.2)
    idx = torch.randint(50, (1, 12))
    full = all_logits(model, idx)
    cache = KVCache(model.config)
    chunked = torch.cat([all_logits(model, idx[:, :4], cache), all_logits(model, idx[:, 4:12], cache)], dim=1)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    cache.reset()
    assert cache.pos == 0
    torch.testing.assert_close(all_logits(model, idx[:, :6], cache), full[:, :6], atol=1e-5, rtol=1e-5)


def test_forward_past_the_context_window_raises(make_model: Factory) -> None:
    model = make_model(block_size=16)
    model(torch.zeros(1, 16, dtype=torch.long))  # exactly one window is fine
    with pytest.raises(ValueError, match="context window"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = KVCache(model.config)
    model(torch.zeros(1, 10, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="context window"):
        model(torch.zeros(1, 7, dtype=torch.long), cache=cache)
    assert cache.pos == 10  # a refused call leaves the cache as it was
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    assert cache.pos == 16


def test_residual_projection_init_is_scaled_by_depth(make_model: Factory) -> None:
    n_layer = 4
    model = make_model(n_layer=n_layer, n_embd=64, vocab_size=100)
    params = dict(model.named_parameters())
    proj = torch.cat([p.flatten() for n, p in params.items() if n.endswith("c_proj.weight")])
    other = torch.cat(
        [p.flatten() for n, p in params.items() if n.endswith(("c_attn.weight", "c_fc.weight"))]
    )
    target = 0.02 / math.sqrt(2 * n_layer)
    assert abs(proj.std().item() - target) < 0.05 * target
    assert abs(other.std().item() - 0.02) < 0.05 * 0.02
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 0.1 * 0.02
    biases = [p for n, p in params.items() if n.endswith(".bias") and ".ln_" not in n and "ln_f" not in n]
    assert biases and all(torch.count_nonzero(b) == 0 for b in biases)


def test_parameter_names_follow_hugging_face_gpt2(make_model: Factory) -> None:
    n_layer = 2
    model = make_model(n_layer=n_layer)
    per_block = [
        "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
        "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
        "mlp.c_proj.weight", "mlp.c_proj.bias",
    ]  # fmt: skip
    expected = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                "transformer.ln_f.bias", "lm_head.weight"}  # fmt: skip
    expected |= {f"transformer.h.{i}.{name}" for i in range(n_layer) for name in per_block}
    assert set(model.state_dict()) == expected
    c = model.config
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # nn.Linear stores (out, in); Hugging Face's Conv1D stores the transpose.
    assert shapes["transformer.h.0.attn.c_attn.weight"] == (3 * c.n_embd, c.n_embd)
    assert shapes["transformer.h.0.mlp.c_fc.weight"] == (4 * c.n_embd, c.n_embd)
    assert shapes["transformer.wpe.weight"] == (c.block_size, c.n_embd)
    assert shapes["lm_head.weight"] == (c.vocab_size, c.n_embd)


def test_dropout_is_active_only_in_training(make_model: Factory) -> None:
    model = make_model(dropout=0.5, spread=0.2)
    idx = torch.randint(50, (2, 16))
    torch.testing.assert_close(model(idx)[0], model(idx)[0])  # eval: deterministic
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])


def test_a_batch_without_targets_has_zero_loss_not_nan() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=20, block_size=8, n_layer=1, n_head=1, n_embd=8))
    idx = torch.randint(0, 20, (2, 8))
    _, loss = model(idx, torch.full((2, 8), -1))
    assert loss is not None and loss.item() == 0.0
    targets = torch.randint(0, 20, (2, 8))
    targets[0] = -1
    _, masked = model(idx, targets)
    logits = all_logits(model, idx)
    expected = torch.nn.functional.cross_entropy(logits[1].float(), targets[1])
    assert masked is not None and torch.allclose(masked, expected)
