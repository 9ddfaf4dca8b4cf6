"""Tests for the engine's CPU training attention (``minigpt2.fast.attention``): its autograd node
computes the textbook's attention.

``CausalAttention``: one autograd node from the fused q, k, v to the heads' output, checked by
``gradcheck`` in float64 (its hand-written backward against finite differences) at contexts with
and without the queries cut in halves, with and without attention dropout (the mask fixed by the
seed); the module against the textbook attention module: output and every gradient in fp32
(with dropout, the textbook replaying the node's masks), output and input gradient within bf16 of
it under autocast (with and without the split). Run with ``pytest tests/fast/test_attention.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from helpers_model import assert_same_function
from minigpt2.core.config import ModelConfig
from minigpt2.core.model import CausalSelfAttention, KVCache, causal_mask
from minigpt2.fast import attention as attention_module
from minigpt2.fast.attention import CausalAttention, CPUTrainingAttention, causal_bias, query_parts
from minigpt2.fast.dropout import keep_mask

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
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_causal_attention_backward_is_the_gradient(
    T: int, n_head: int, dropout: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gradcheck in float64: from a context of 4 on the queries are cut in halves (odd and even);
    with dropout, each call reseeds so that every evaluation draws the same masks."""
    monkeypatch.setattr(attention_module, "SPLIT_FROM", 4)
    torch.manual_seed(T)
    qkv = torch.randn(2, T, 3 * n_head * 4, dtype=torch.float64, requires_grad=True)

    def attention(t: Tensor) -> Tensor:
        torch.manual_seed(0)
        return CausalAttention.apply(t, n_head, dropout)  # type: ignore[no-untyped-call,no-any-return]

    assert torch.autograd.gradcheck(attention, (qkv,))


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


class ReplayedDropout(nn.Module):
    """The textbook's ``attn_dropout`` replaying masks the node drew: each part's (B*nh, e - s, e)
    0/1 mask placed in its rows of the (B, nh, T, T) probabilities (the keys after e, masked to 0
    by the causal mask, kept), scaled by 1 / (1 - p)."""

    def __init__(self, masks: list[Tensor], n_head: int, p: float) -> None:
        super().__init__()
        self.masks, self.n_head, self.p = masks, n_head, p

    def forward(self, att: Tensor) -> Tensor:
        B, nh, T, _ = att.shape
        full = torch.ones_like(att)
        for (s, e), mask in zip(query_parts(T), self.masks, strict=True):
            full[:, :, s:e, :e] = mask.view(B, nh, e - s, e)
        return att * full / (1 - self.p)


@pytest.mark.parametrize(("T", "split_from"), [(7, None), (9, 4), (128, None)])
def test_tuned_module_with_dropout_equals_the_textbook_with_its_masks(
    T: int, split_from: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With attention dropout the node draws one ``keep_mask`` per part at p; the textbook module
    (written out) applying those masks gives the same output and gradients, in fp32."""
    if split_from is not None:
        monkeypatch.setattr(attention_module, "SPLIT_FROM", split_from)
    p = 0.25
    plain, tuned = _pair(dropout=p)
    drawn: list[Tensor] = []

    def recording(shape: torch.Size, rate: float, dtype: torch.dtype) -> Tensor:
        assert rate == p
        drawn.append(keep_mask(shape, rate, dtype))
        return drawn[-1]

    monkeypatch.setattr(attention_module, "keep_mask", recording)
    calls = _spy_on_the_node(monkeypatch)
    plain.attn_dropout = ReplayedDropout(drawn, n_head=2, p=p)
    plain.resid_dropout = tuned.resid_dropout = nn.Identity()
    assert_same_function(tuned, plain, torch.randn(3, T, 64))
    assert calls and len(drawn) == len(query_parts(T))
    share = torch.cat([m.flatten() for m in drawn]).eq(0).float().mean().item()
    assert 0.15 < share < 0.35  # about p of the probabilities dropped


def test_other_cases_take_the_textbook_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inference, no gradients, a KV cache and a model being compiled never run ``CausalAttention``."""
    monkeypatch.setattr(CausalAttention, "apply", lambda *a: pytest.fail("CausalAttention used"))
    x = torch.randn(2, 6, 64)
    plain, tuned = _pair()
    with torch.no_grad():
        torch.testing.assert_close(tuned(x), plain(x))
    torch.testing.assert_close(tuned.eval()(x), plain.eval()(x))
    config = ModelConfig(**SHAPE)  # type: ignore[arg-type]
    got = tuned.train()(x, KVCache(config, batch_size=2))
    torch.testing.assert_close(got, plain.train()(x, KVCache(config, batch_size=2)))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(tuned(x), plain(x))


def test_causal_bias_is_the_mask_as_an_addition() -> None:
    for T, Tk in ((4, 4), (2, 5), (1, 3)):
        bias = causal_bias(T, Tk, torch.bfloat16, torch.device("cpu"))
        assert bias.dtype == torch.bfloat16
        assert torch.equal(bias == 0, causal_mask(T, Tk, torch.device("cpu")))
        assert torch.equal(bias != 0, bias == float("-inf"))
