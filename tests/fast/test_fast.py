"""Tests for the engine (``minigpt2.fast``): each drop-in computes what its textbook piece computes.

The contract between the two layers: ``speed_up`` keeps every parameter and the state dict; the fast
model gives the reference's logits at inference (fp32: to rounding) and its loss and gradients in
CPU training (fp32: to rounding; bf16 autocast: loss within 1%, gradients within 5%); the CPU
the dropout drops a share p and scales the rest. The attention's and the GELU's own tests are in
``tests/fast/test_attention.py`` and ``tests/fast/test_gelu.py``. Run with ``pytest tests/fast/test_fast.py``.
"""

from __future__ import annotations

import pytest
import torch

from minigpt2.core.config import ModelConfig
from minigpt2.core.model import GPT, MLP, CausalSelfAttention
from minigpt2.fast import speed_up, to_reference, use_engine
from minigpt2.fast.attention import CPUTrainingAttention
from minigpt2.fast.decode import FastGPT
from minigpt2.fast.dropout import FastDropout
from minigpt2.fast.gelu import CompiledGELU, CompiledGELUMLP

SHAPE = dict(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=64)


def _twins(**overrides: object) -> tuple[GPT, GPT]:
    """(textbook, fast) models with the same weights."""
    torch.manual_seed(0)
    reference = GPT(ModelConfig(**{**SHAPE, **overrides}))  # type: ignore[arg-type]
    fast = GPT(ModelConfig(**{**SHAPE, **overrides}))  # type: ignore[arg-type]
    fast.load_state_dict(reference.state_dict())
    return reference, speed_up(fast)


def test_speed_up_swaps_classes_and_keeps_parameters_and_state() -> None:
    model = GPT(ModelConfig(**SHAPE, dropout=0.1))  # type: ignore[arg-type]
    params = {name: p for name, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    speed_up(model)
    assert type(model) is FastGPT and isinstance(model, GPT)
    kinds = {type(m) for m in model.modules()}
    assert {CPUTrainingAttention, FastDropout, CompiledGELU, CompiledGELUMLP} <= kinds
    assert not kinds & {CausalSelfAttention, MLP, torch.nn.Dropout, torch.nn.GELU}
    assert {name: p for name, p in model.named_parameters()} == params  # the same tensors
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.state_dict().keys() == state.keys()
    to_reference(model)
    assert type(model) is GPT and {type(m) for m in model.modules()}.isdisjoint(
        {FastGPT, CPUTrainingAttention, FastDropout, CompiledGELU, CompiledGELUMLP}
    )
    assert use_engine(model, "fast") is model and type(model) is FastGPT
    with pytest.raises(ValueError, match="fast or reference"):
        use_engine(model, "turbo")


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_fast_model_gives_the_reference_logits_at_inference(attn_impl: str) -> None:
    reference, fast = _twins(attn_impl=attn_impl)
    idx = torch.randint(0, 50, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(idx)[0], reference.eval()(idx)[0], atol=1e-5, rtol=1e-5)


def test_fast_cpu_training_in_fp32_gives_the_reference_loss_and_gradients() -> None:
    """fp32, no dropout: the tuned attention and the compiled GELU (forced on this small model) give
    the textbook's loss and gradients to fp32 rounding."""
    reference, fast = _twins(attn_impl="manual")
    old = CompiledGELU.COMPILED_MIN_NUMEL
    CompiledGELU.COMPILED_MIN_NUMEL = 1
    try:
        idx, targets = torch.randint(0, 50, (4, 32)), torch.randint(0, 50, (4, 32))
        _, fast_loss = fast.train()(idx, targets)
        _, ref_loss = reference.train()(idx, targets)
        assert fast_loss is not None and ref_loss is not None
        fast_loss.backward()
        ref_loss.backward()
    finally:
        CompiledGELU.COMPILED_MIN_NUMEL = old
    torch.testing.assert_close(fast_loss, ref_loss, atol=1e-5, rtol=1e-5)
    for (name, p_fast), p_ref in zip(fast.named_parameters(), reference.parameters(), strict=True):
        assert p_fast.grad is not None and p_ref.grad is not None
        torch.testing.assert_close(p_fast.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_fast_cpu_dropout_is_dropout(p: float) -> None:
    """The engine's CPU dropout zeroes a share p of elements and keeps the mean (scaling)."""
    torch.manual_seed(0)
    drop = FastDropout(p).train()
    x = torch.ones(400_001, requires_grad=True)  # not a multiple of 4: the last 64-bit draw is cut
    y = drop(x)
    zeroed = (y == 0).float().mean().item()
    assert abs(zeroed - p) < 0.005 and abs(y.mean().item() - 1.0) < 0.02
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - p)))  # kept elements are scaled
    assert abs((y[:200_000] == 0).float().mean().item() - (y[200_000:] == 0).float().mean().item()) < 0.01
    y.sum().backward()  # gradients flow through the kept elements only, scaled like the values
    assert x.grad is not None and torch.equal(x.grad, y.detach())
    assert torch.equal(drop.eval()(x), x)  # inactive in eval mode
    torch.manual_seed(1)
    a = FastDropout(p).train()(x)
    torch.manual_seed(1)
    assert torch.equal(FastDropout(p).train()(x), a)  # seeded: same mask
    assert not torch.equal(FastDropout(p).train()(x), a)  # and a new mask on each call


@pytest.mark.parametrize("p", [1e-7, 0.9999999])
def test_fast_cpu_dropout_takes_any_p_in_range(p: float) -> None:
    """A p too close to 0 or 1 for 16-bit steps still works (the nearest step: 1/65536 from the end)."""
    zeroed = (FastDropout(p).train()(torch.ones(100_000)) == 0).float().mean().item()
    assert abs(zeroed - p) < 0.001


def test_fast_cpu_training_path_agrees_with_the_reference_within_bf16() -> None:
    """The default CPU training path (bf16 autocast, the fast engine: the tuned attention in bf16
    with a bf16 softmax) against the textbook (fp32, manual attention): the same loss
    and gradients within bf16 rounding (dropout 0, so both are deterministic)."""
    torch.manual_seed(0)
    shape = dict(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0)
    fast = speed_up(GPT(ModelConfig(**shape))).train()
    reference = GPT(ModelConfig(**shape, attn_impl="manual")).train()
    reference.load_state_dict(fast.state_dict())
    idx, targets = torch.randint(0, 50, (4, 32)), torch.randint(0, 50, (4, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, fast_loss = fast(idx, targets)
    _, ref_loss = reference(idx, targets)
    assert fast_loss is not None and ref_loss is not None
    fast_loss.backward()
    ref_loss.backward()
    assert abs(fast_loss.item() - ref_loss.item()) < 0.01 * ref_loss.item()
    for (name, p_fast), p_ref in zip(fast.named_parameters(), reference.parameters(), strict=True):
        assert p_fast.grad is not None and p_ref.grad is not None
        error = (p_fast.grad.float() - p_ref.grad).norm() / p_ref.grad.norm().clamp(min=1e-12)
        assert error < 0.05, (name, float(error))
