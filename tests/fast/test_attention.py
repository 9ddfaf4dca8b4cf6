"""Tests for the engine's CPU training attention (``minigpt2.fast.attention``): both of its paths
compute the textbook's attention.

``CausalAttention`` (no attention dropout): one autograd node from the fused q, k, v to the heads'
output, checked by ``gradcheck`` in float64 (its hand-written backward against finite differences)
at contexts with and without the queries cut in halves; the module against the textbook attention
module: output and every gradient in fp32, output and input gradient within bf16 of it under
autocast (with and without the split). ``attend`` (with dropout): the textbook's output and
gradients, with a cache offset and with split queries. Run with ``pytest tests/fast/test_attention.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from helpers_model import assert_same_function
from minigpt2.core.config import ModelConfig
from minigpt2.core.model import CausalSelfAttention, KVCache, causal_mask
from minigpt2.fast import attention as attention_module
from minigpt2.fast.attention import CausalAttention, CPUTrainingAttention, causal_bias, query_parts

SHAPE = dict(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=64)


def _pair(tuned_impl: str = "sdpa", **overrides: Any) -> tuple[CausalSelfAttention, CausalSelfAttention]:
    """(textbook with written-out attention, tuned from a config with ``tuned_impl``) modules with
    the same weights, in training."""
    torch.manual_seed(0)
    plain = CausalSelfAttention(ModelConfig(**{**SHAPE, **overrides, "attn_impl": "manual"})).train()
    tuned = CausalSelfAttention(ModelConfig(**{**SHAPE, **overrides, "attn_impl": tuned_impl})).train()
    tuned.load_state_dict(plain.state_dict())
    tuned.__class__ = CPUTrainingAttention
    return plain, tuned


def _spy_on_the_node(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """The arguments of every ``CausalAttention.apply`` call from now on."""
    calls: list[tuple[Any, ...]] = []
    real = CausalAttention.apply

    def counting(*args: Any) -> torch.Tensor:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(CausalAttention, "apply", counting)
    return calls


@pytest.mark.parametrize("T", [1, 2, 5, 8, 9])
@pytest.mark.parametrize("n_head", [1, 3])
def test_causal_attention_backward_is_the_gradient(
    T: int, n_head: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gradcheck in float64: from a context of 4 on the queries are cut in halves (odd and even)."""
    monkeypatch.setattr(attention_module, "SPLIT_FROM", 4)
    torch.manual_seed(T)
    qkv = torch.randn(2, T, 3 * n_head * 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: CausalAttention.apply(t, n_head), (qkv,))


def test_query_parts_cover_every_query_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention_module, "SPLIT_FROM", 4)
    assert query_parts(3) == [(0, 3)]
    for T in (4, 5, 128):
        parts = query_parts(T)
        assert parts[0][1] == T  # the part seeing every key comes first: it starts dk and dv
        assert sorted(q for s, e in parts for q in range(s, e)) == list(range(T))


@pytest.mark.parametrize(
    ("T", "split_from", "tuned_impl"),
    [(128, None, "sdpa"), (9, 4, "manual"), (6, None, "sdpa"), (1, None, "manual")],
)
def test_tuned_module_without_dropout_equals_the_textbook(
    T: int, split_from: int | None, tuned_impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole module (c_attn, the attention, c_proj) in fp32 CPU training: the textbook's output
    and the gradients of its input and of every parameter, to fp32 rounding; ``CausalAttention``
    is the path it takes, whatever ``attn_impl`` the config names."""
    if split_from is not None:
        monkeypatch.setattr(attention_module, "SPLIT_FROM", split_from)
    plain, tuned = _pair(tuned_impl)
    calls = _spy_on_the_node(monkeypatch)
    assert_same_function(tuned, plain, torch.randn(3, T, 64))
    assert calls


@pytest.mark.parametrize(("T", "split_from"), [(20, None), (128, None), (9, 4)])
def test_tuned_module_under_bf16_autocast_stays_within_bf16_of_fp32(
    T: int, split_from: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under autocast the projections run in bf16 and the node computes in their dtype: output and
    input gradient within bf16 rounding of the fp32 textbook, with and without the split."""
    if split_from is not None:
        monkeypatch.setattr(attention_module, "SPLIT_FROM", split_from)
    plain, tuned = _pair()
    calls = _spy_on_the_node(monkeypatch)
    x = torch.randn(4, T, 64, requires_grad=True)
    twin = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = tuned(x)
    expected = plain(twin)
    assert [args[0].dtype for args in calls] == [torch.bfloat16]
    assert ((got.float() - expected).norm() / expected.norm()) < 0.02
    weights = torch.randn_like(expected)
    (got.float() * weights).sum().backward()
    (expected * weights).sum().backward()
    assert x.grad is not None and twin.grad is not None
    assert ((x.grad - twin.grad).norm() / twin.grad.norm()) < 0.05


def test_other_cases_take_the_textbook_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropout, inference, no gradients, a KV cache and a model being compiled never run
    ``CausalAttention``; in training with dropout the block's own forward calls the tuned ``attend``."""
    monkeypatch.setattr(CausalAttention, "apply", lambda *a: pytest.fail("CausalAttention used"))
    x = torch.randn(2, 6, 64)
    _, dropping = _pair(dropout=0.1)
    attends = []
    real_attend = CPUTrainingAttention.attend

    def counting(self: CPUTrainingAttention, *args: torch.Tensor) -> torch.Tensor:
        attends.append(args)
        return real_attend(self, *args)

    monkeypatch.setattr(CPUTrainingAttention, "attend", counting)
    dropping(x)
    assert attends
    plain, tuned = _pair()
    with torch.no_grad():
        torch.testing.assert_close(tuned(x), plain(x))
    torch.testing.assert_close(tuned.eval()(x), plain.eval()(x))
    config = ModelConfig(**SHAPE)  # type: ignore[arg-type]
    got = tuned.train()(x, KVCache(config, batch_size=2))
    torch.testing.assert_close(got, plain.train()(x, KVCache(config, batch_size=2)))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(tuned(x), plain(x))


def test_attend_equals_the_textbook_attention() -> None:
    """``attend`` alone, fp32, with a cache offset (T < Tk): same output to rounding, in training
    (the tuned path) and at inference (the textbook's own)."""
    torch.manual_seed(0)
    config = ModelConfig(**SHAPE)  # type: ignore[arg-type]
    plain = CausalSelfAttention(config).train()
    tuned = CausalSelfAttention(config).train()
    tuned.__class__ = CPUTrainingAttention
    q, k, v = torch.randn(2, 2, 5, 32), torch.randn(2, 2, 9, 32), torch.randn(2, 2, 9, 32)
    torch.testing.assert_close(tuned.attend(q, k, v), plain.attend(q, k, v), atol=1e-5, rtol=1e-5)
    manual = CausalSelfAttention(ModelConfig(**SHAPE, attn_impl="manual")).train()  # type: ignore[arg-type]
    torch.testing.assert_close(tuned.attend(q, k, v), manual.attend(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("T", "split_from"), [(9, 4), (8, 4), (128, None), (6, None)])
def test_attend_with_split_queries_equals_the_textbook(
    T: int, split_from: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From ``SPLIT_FROM`` on, the queries' halves are attended separately: the textbook's output
    and gradients (fp32, to rounding), odd and even contexts, and the layout the block re-assembles
    the heads from (``transpose(1, 2)`` of the result is contiguous)."""
    if split_from is not None:
        monkeypatch.setattr(attention_module, "SPLIT_FROM", split_from)
    torch.manual_seed(0)
    config = ModelConfig(**{**SHAPE, "attn_impl": "manual"})  # type: ignore[arg-type]
    plain = CausalSelfAttention(config).train()
    tuned = CausalSelfAttention(config).train()
    tuned.__class__ = CPUTrainingAttention
    inputs = [torch.randn(3, 2, T, 8, requires_grad=True) for _ in range(3)]
    twins = [x.detach().clone().requires_grad_() for x in inputs]
    got, expected = tuned.attend(*inputs), plain.attend(*twins)
    split = T >= attention_module.SPLIT_FROM
    assert got.transpose(1, 2).is_contiguous() == split
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(expected)
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    for x, twin in zip(inputs, twins, strict=True):
        torch.testing.assert_close(x.grad, twin.grad, atol=1e-5, rtol=1e-5)


def test_causal_bias_is_the_mask_as_an_addition() -> None:
    for T, Tk in ((4, 4), (2, 5), (1, 3)):
        bias = causal_bias(T, Tk, torch.bfloat16, torch.device("cpu"))
        assert bias.dtype == torch.bfloat16
        assert torch.equal(bias == 0, causal_mask(T, Tk, torch.device("cpu")))
        assert torch.equal(bias != 0, bias == float("-inf"))
