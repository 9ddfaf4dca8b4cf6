"""Tests for ``minigpt2.fast.decode``: the flat one-token step against the model it flattens.

The step must give the model's logits at every position (fp32: to rounding; bf16 autocast: within
bf16 tolerance), leave the cache as the model would, refuse what it cannot do, and follow the
weights as they train. Generation through it is checked token for token against the cache-free
path in ``tests/core/test_generate.py``. Run with ``pytest tests/fast/test_decode.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from helpers_model import all_logits
from minigpt2.core.config import SampleConfig
from minigpt2.core.model import GPT, KVCache
from minigpt2.core.stream import generate_ids
from minigpt2.fast import speed_up
from minigpt2.fast.decode import Decoder

Factory = Callable[..., GPT]


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
@pytest.mark.parametrize("prefill", [1, 6])
@pytest.mark.parametrize("n_embd", [32, 36])  # head sizes 8 and 9
def test_step_gives_the_model_logits_at_every_position(
    make_model: Factory, attn_impl: str, prefill: int, n_embd: int
) -> None:
    model = make_model(attn_impl=attn_impl, block_size=16, n_head=4, n_embd=n_embd, spread=0.3)
    idx = torch.randint(50, (1, 16), generator=torch.Generator().manual_seed(prefill))
    with torch.inference_mode():
        full = all_logits(model, idx)  # (1, 16, V): the cache-free reference
        cache, reference_cache = KVCache(model.config), KVCache(model.config)
        model(idx[:, :prefill], cache=cache)
        model(idx[:, :prefill], cache=reference_cache)
        decoder = Decoder(model)
        for t in range(prefill, 16):
            logits = decoder.step(int(idx[0, t]), cache)  # (V,)
            torch.testing.assert_close(logits, full[0, t], atol=1e-5, rtol=1e-5)
            model(idx[:, t : t + 1], cache=reference_cache)
            assert cache.pos == reference_cache.pos == t + 1
    assert cache.k is not None and reference_cache.k is not None
    assert cache.v is not None and reference_cache.v is not None
    torch.testing.assert_close(cache.k, reference_cache.k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.v, reference_cache.v, atol=1e-5, rtol=1e-5)


def test_step_under_bf16_autocast_is_the_model_under_bf16_autocast(make_model: Factory) -> None:
    model = make_model(block_size=16, spread=0.1)
    idx = torch.randint(50, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = all_logits(model, idx)
        cache, reference_cache = KVCache(model.config), KVCache(model.config)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(idx[:, :4], cache=cache)
            model(idx[:, :4], cache=reference_cache)
            decoder = Decoder(model)
            steps = torch.stack([decoder.step(int(idx[0, t]), cache) for t in range(4, 12)])
            reference = torch.cat(
                [model(idx[:, t : t + 1], cache=reference_cache)[0][0] for t in range(4, 12)]
            )
    assert steps.dtype == reference.dtype == torch.bfloat16  # the step ran under autocast too
    # The same operations in the same precisions (an fp32 residual stream, bf16 products): the same
    # numbers, to the bit; a residual stream left in bf16 was ~1e-3 apart.
    assert torch.equal(steps, reference)
    assert cache.kv is not None and reference_cache.kv is not None
    assert torch.equal(cache.kv, reference_cache.kv)
    torch.testing.assert_close(steps.float(), full[0, 4:12], atol=0.1, rtol=0.05)  # bf16 of fp32


@pytest.mark.parametrize("bf16", [False, True])
def test_step_on_an_empty_cache_is_the_model_on_one_id(make_model: Factory, bf16: bool) -> None:
    model = make_model(block_size=8, spread=0.3)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        cache, reference_cache = KVCache(model.config), KVCache(model.config)
        logits = Decoder(model).step(3, cache)
        reference = model(torch.tensor([[3]]), cache=reference_cache)[0][0, -1]
    torch.testing.assert_close(logits.float(), reference.float(), atol=1e-5, rtol=1e-5)
    assert cache.pos == reference_cache.pos == 1
    assert cache.kv is not None and reference_cache.kv is not None
    assert cache.kv.dtype == reference_cache.kv.dtype and cache.kv.shape == reference_cache.kv.shape
    torch.testing.assert_close(cache.kv, reference_cache.kv, atol=1e-5, rtol=1e-5)


def test_step_refuses_a_full_or_batched_cache(make_model: Factory) -> None:
    model = make_model(block_size=8)
    decoder = Decoder(model)
    with torch.inference_mode():
        batched = KVCache(model.config, batch_size=2)
        model(torch.zeros(2, 3, dtype=torch.long), cache=batched)
        with pytest.raises(ValueError, match="batch-1"):
            decoder.step(1, batched)
        cache = KVCache(model.config)
        model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="context window"):
            decoder.step(1, cache)
        assert cache.pos == 8  # a refused step leaves the cache as it was


def test_step_follows_the_weights_as_they_change(make_model: Factory) -> None:
    """The decoder shares the model's tensors: a step after an update (training in the notebook,
    ``load_state_dict``) uses the new weights, as the model does."""
    model = make_model(block_size=8, spread=0.2)
    decoder = Decoder(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    idx = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.inference_mode():
        full = all_logits(model, idx)
        cache = KVCache(model.config)
        model(idx[:, :4], cache=cache)
        torch.testing.assert_close(decoder.step(5, cache), full[0, 4], atol=1e-5, rtol=1e-5)


def _count_steps(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> list[int]:
    """Record (or refuse) every ``Decoder.step`` call; returns the list the calls append to."""
    calls: list[int] = []
    real = Decoder.step

    def step(self: Decoder, token: int | torch.Tensor, cache: KVCache) -> torch.Tensor:
        if fail:
            raise AssertionError("the flat step must not run here")
        calls.append(int(token))
        return real(self, token, cache)

    monkeypatch.setattr(Decoder, "step", step)
    return calls


def test_generation_goes_through_the_step_between_refills(
    make_model: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = speed_up(make_model(block_size=8, spread=0.3))
    calls = _count_steps(monkeypatch)
    forwards = 0
    real_forward = GPT.forward

    def forward(self: GPT, *args: object, **kwargs: object) -> object:
        nonlocal forwards
        forwards += 1
        return real_forward(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(GPT, "forward", forward)
    ids = list(generate_ids(model, [1, 2, 3], SampleConfig(max_new_tokens=30, temperature=0.0)))
    assert len(ids) == 30
    # The prompt, then a refill each time the 8-id window is full (keeping 4): 1 + 5 forwards.
    assert forwards == 6 and len(calls) == 30 - forwards
    assert set(calls) <= set(ids)  # each step feeds the id generated before it


def test_generation_on_the_reference_engine_uses_the_model(
    make_model: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model(block_size=8, spread=0.3, attn_impl="manual")  # not sped up: the textbook
    _count_steps(monkeypatch, fail=True)
    assert len(list(generate_ids(model, [1, 2], SampleConfig(max_new_tokens=20, temperature=0.0)))) == 20


def test_generation_from_a_model_in_training_mode_uses_the_model(
    make_model: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With dropout active (a model left in ``train()``), steps go through the model, which applies
    it; the flat step has no dropout. Greedy ids then differ from run to run only through dropout."""
    model = speed_up(make_model(block_size=8, spread=0.3, dropout=0.5)).train()
    cfg = SampleConfig(max_new_tokens=20, temperature=0.0)
    _count_steps(monkeypatch, fail=True)
    torch.manual_seed(0)
    first = list(generate_ids(model, [1, 2], cfg))
    torch.manual_seed(1)
    second = list(generate_ids(model, [1, 2], cfg))
    assert len(first) == len(second) == 20
    assert first != second  # dropout was applied: the model's forward ran
    monkeypatch.undo()
    model.eval()
    assert list(generate_ids(model, [1, 2], cfg)) == list(generate_ids(model, [1, 2], cfg, use_cache=False))
