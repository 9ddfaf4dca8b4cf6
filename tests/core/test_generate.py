"""Tests for ``core.generate`` and ``core.stream``: the logit filters, the id generator, the text stream.

Covers top-k / top-p / repetition penalty (pure, distribution-preserving, with hypothesis), cached
vs cache-free greedy decoding far past the context window for both attention implementations,
seeds, stop ids, stop strings (cut and hold-back), empty prompts and ``SampleConfig`` validation.
Tiny CPU models with widened random weights, so outputs vary. Run with ``pytest tests/core/test_generate.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt2.core.config import SampleConfig
from minigpt2.core.generate import apply_repetition_penalty, generate, top_k_filter, top_p_filter
from minigpt2.core.model import GPT
from minigpt2.core.stream import generate_ids, stream_text
from minigpt2.core.tokenizer import EOT_ID, CharTokenizer
from minigpt2.errors import ConfigError
from minigpt2.fast import speed_up, use_engine
from minigpt2.hardware.precision import choose_precision

Factory = Callable[..., GPT]
GREEDY = SampleConfig(max_new_tokens=40, temperature=0.0)


def test_top_k_keeps_the_k_largest_and_is_pure() -> None:
    logits = torch.tensor([0.5, 3.0, -1.0, 2.0, 1.0, -4.0])
    before = logits.clone()
    out = top_k_filter(logits, 3)
    assert torch.equal(logits, before)
    kept = torch.isfinite(out)
    assert kept.sum() == 3
    assert set(kept.nonzero().flatten().tolist()) == set(torch.topk(logits, 3).indices.tolist())
    assert torch.equal(out[kept], logits[kept])
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, 100), logits)


def test_top_p_keeps_the_smallest_nucleus_and_the_argmax() -> None:
    probs = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])
    logits = probs.log()
    before = logits.clone()
    for p, expected in [
        (0.45, {1}),
        (0.55, {1, 3}),
        (0.79, {1, 3}),
        (0.81, {1, 2, 3}),
        (0.01, {1}),
        (0.99, set(range(5))),
    ]:
        out = top_p_filter(logits, p)
        kept = set(torch.isfinite(out).nonzero().flatten().tolist())
        assert kept == expected, (p, kept)
        assert sum(probs[i].item() for i in kept) >= min(p, 1.0) - 1e-6
    assert torch.equal(logits, before)
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_repetition_penalty_lowers_seen_ids_only() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5])
    before = logits.clone()
    context = torch.tensor([0, 1, 1])
    out = apply_repetition_penalty(logits, context, 2.0)
    assert torch.equal(logits, before)
    assert out[0] < logits[0] and out[1] < logits[1]
    assert torch.equal(out[2:], logits[2:])
    assert torch.allclose(out[:2], torch.tensor([1.0, -4.0]))
    assert torch.equal(apply_repetition_penalty(logits, context, 1.0), logits)
    assert torch.equal(apply_repetition_penalty(logits, torch.tensor([], dtype=torch.long), 2.0), logits)


_logits = st.lists(
    st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32), min_size=1, max_size=64
).map(lambda xs: torch.tensor(xs, dtype=torch.float32))


@settings(max_examples=300, deadline=None)
@given(_logits, st.integers(min_value=0, max_value=70), st.floats(min_value=1e-6, max_value=1.0))
def test_property_filtered_distribution_is_valid(logits: torch.Tensor, k: int, p: float) -> None:
    after_k = top_k_filter(logits, k)
    if 0 < k < len(logits):  # exactly the ids at least as likely as the k-th (ties all stay)
        kth = torch.sort(logits, descending=True).values[k - 1]
        assert torch.equal(torch.isfinite(after_k), logits >= kth)
    filtered = top_p_filter(after_k, p)
    probs = torch.softmax(filtered, dim=-1)
    assert not torch.isnan(probs).any()
    assert abs(probs.sum().item() - 1.0) < 1e-4
    kept = torch.isfinite(filtered)
    assert filtered[kept].max() == logits.max()  # the likeliest id (one of them, on ties) survives
    assert torch.softmax(after_k, dim=-1)[kept].sum().item() >= p - 1e-4  # the nucleus reaches p
    assert kept[torch.multinomial(probs, 1)].item()


def _greedy(model: GPT, prompt: list[int], n: int, use_cache: bool) -> list[int]:
    return list(
        generate_ids(model, prompt, SampleConfig(max_new_tokens=n, temperature=0.0), use_cache=use_cache)
    )


@pytest.mark.parametrize("engine", ["fast", "reference"])
@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
@pytest.mark.parametrize("prompt_len", [1, 7, 20])
def test_cached_and_uncached_greedy_agree_past_the_window(
    make_model: Factory, engine: str, attn_impl: str, prompt_len: int
) -> None:
    model = use_engine(make_model(block_size=8, attn_impl=attn_impl, spread=0.5), engine)
    prompt = torch.randint(50, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    n = 3 * model.config.block_size + 5
    cached = _greedy(model, prompt, n, use_cache=True)
    uncached = _greedy(model, prompt, n, use_cache=False)
    assert len(cached) == n
    assert cached == uncached
    assert len(set(cached)) > 1  # the model is not stuck on one id, so the comparison means something


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 5, 1.0), (1.2, 0, 0.9)]
)
def test_the_fast_path_gives_the_reference_loops_ids(
    make_model: Factory, temperature: float, top_k: int, top_p: float
) -> None:
    """The textbook ``generate`` on the textbook model, and ``generate_ids`` on the fast engine (the
    flat decode step): the same ids with the same seed, up to the end of the window."""
    reference = make_model(block_size=24, spread=0.4, attn_impl="manual")
    fast = make_model(block_size=24, spread=0.4)
    fast.load_state_dict(reference.state_dict())
    speed_up(fast)
    prompt = [3, 1, 4, 1, 5]
    for seed in range(3):
        expected = generate(
            reference, prompt, 19, temperature, top_k, top_p, torch.Generator().manual_seed(seed)
        )
        cfg = SampleConfig(max_new_tokens=19, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        assert list(generate_ids(fast, prompt, cfg)) == expected
        assert len(expected) == 19 and (temperature == 0 or len(set(expected)) > 1)
    # At the end of the window the reference loop stops; generate_ids slides on.
    assert len(generate(reference, prompt, 100, temperature=0.0)) == 24 - len(prompt) + 1


def test_a_prompt_longer_than_the_window_starts_from_its_last_window(make_model: Factory) -> None:
    model = make_model(block_size=8, spread=0.5)
    prompt = torch.randint(50, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    cached = _greedy(model, prompt, 20, use_cache=True)
    assert cached == _greedy(model, prompt, 20, use_cache=False)
    assert cached == _greedy(model, prompt[-8:], 20, use_cache=True)


def test_sampling_is_reproducible_by_seed(make_model: Factory) -> None:
    model = make_model(spread=0.3)

    def sample(seed: int, use_cache: bool = True) -> list[int]:
        cfg = SampleConfig(max_new_tokens=30, temperature=1.0, seed=seed)
        return list(generate_ids(model, [5, 6, 7], cfg, use_cache=use_cache))

    assert sample(1) == sample(1)
    assert sample(1) == sample(1, use_cache=False)
    assert len({tuple(sample(seed)) for seed in range(5)}) > 1
    gen = torch.Generator().manual_seed(1)
    cfg = SampleConfig(max_new_tokens=30, temperature=1.0)
    assert list(generate_ids(model, [5, 6, 7], cfg, generator=gen)) == sample(1)


def test_stop_ids_end_generation_before_the_stop(make_model: Factory) -> None:
    model = make_model(spread=0.5)
    full = list(generate_ids(model, [3, 9], GREEDY))
    stop = full[len(full) // 2]
    cut = list(generate_ids(model, [3, 9], GREEDY, stop_ids=[stop]))
    assert cut == full[: full.index(stop)]
    assert stop not in cut


def test_generation_rejects_an_empty_id_prompt(make_model: Factory) -> None:
    with pytest.raises(ValueError):
        list(generate_ids(make_model(), [], GREEDY))


def test_generation_under_bf16_autocast(make_model: Factory) -> None:
    model = make_model(spread=0.3)
    precision = choose_precision(torch.device("cpu"), "bf16")
    ids = list(generate_ids(model, [1, 2, 3], SampleConfig(max_new_tokens=40, seed=0), precision=precision))
    assert len(ids) == 40 and all(0 <= i < 50 for i in ids)


@pytest.fixture
def lively(make_model: Factory, tok: CharTokenizer) -> GPT:
    return make_model(vocab_size=tok.vocab_size, block_size=16, spread=0.5, seed=3)


# Seeded sampling: the same seed gives the same characters up to any stop, so a stopped stream
# must be exactly the unstopped one cut short.
VARIED = SampleConfig(max_new_tokens=120, temperature=1.0, seed=7)


def _text(model: GPT, tok: CharTokenizer, prompt: str, stops: list[str]) -> list[str]:
    return list(stream_text(model, tok, prompt, VARIED, stop_strings=stops, stop_ids=()))


def test_stream_without_stops_is_the_decoded_ids(lively: GPT, tok: CharTokenizer) -> None:
    ids = list(generate_ids(lively, tok.encode("Hello"), VARIED))
    text = "".join(_text(lively, tok, "Hello", []))
    assert text == tok.decode(ids)
    assert len(set(text)) > 10  # varied text, so the stop-string cases below are not trivial


@pytest.mark.parametrize("start", [0, 5, 37, 90])
@pytest.mark.parametrize("length", [1, 2, 4])
def test_stop_strings_cut_before_the_first_occurrence(
    lively: GPT, tok: CharTokenizer, start: int, length: int
) -> None:
    full = "".join(_text(lively, tok, "Hello", []))
    stop = full[start : start + length]
    assert len(stop) == length
    pieces = _text(lively, tok, "Hello", [stop])
    out = "".join(pieces)
    assert stop not in out
    assert out == full[: full.index(stop)]
    assert all(pieces)  # no empty pieces


def test_earliest_of_several_stop_strings_wins(lively: GPT, tok: CharTokenizer) -> None:
    full = "".join(_text(lively, tok, "Hello", []))
    late, early = full[60:63], full[20:22]
    cut = min(full.index(late), full.index(early))
    assert "".join(_text(lively, tok, "Hello", [late, early])) == full[:cut]


def test_partial_stop_matches_are_held_back_then_released(lively: GPT, tok: CharTokenizer) -> None:
    full = "".join(_text(lively, tok, "Hello", []))
    missing = next(c for c in tok.chars if c not in full)
    stop = full[40:43] + missing  # its first three characters appear, the whole never does
    pieces = _text(lively, tok, "Hello", [stop])
    assert "".join(pieces) == full
    shown = ""
    for piece in pieces:  # nothing is shown while it could still be the start of the stop string
        shown += piece
        assert not any(stop[:n] == shown[-n:] for n in range(1, len(stop))) or shown == full


def test_stream_stops_at_eot_by_default(lively: GPT, tok: CharTokenizer) -> None:
    cfg = SampleConfig(max_new_tokens=300, temperature=1.0, seed=3)
    ids = list(generate_ids(lively, tok.encode("Hi"), cfg))
    text = "".join(stream_text(lively, tok, "Hi", cfg))
    assert EOT_ID in ids
    assert text == tok.decode(ids[: ids.index(EOT_ID)])


@pytest.mark.parametrize("chars", [None, ["a", "b"]])
def test_empty_prompt_works(make_model: Factory, tok: CharTokenizer, chars: list[str] | None) -> None:
    tokenizer = tok if chars is None else CharTokenizer(chars)
    model = make_model(vocab_size=tokenizer.vocab_size, spread=0.3)
    cfg = SampleConfig(max_new_tokens=10, temperature=1.0, seed=0)
    out = "".join(stream_text(model, tokenizer, "", cfg, stop_ids=()))
    # Documented: an empty prompt starts from a line break, or from the end of a turn.
    start = tokenizer.encode("\n") if "\n" in tokenizer.chars else [EOT_ID]
    assert out == tokenizer.decode(generate_ids(model, start, cfg))
    assert out


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": 2.5},
        {"temperature": float("nan")},
        {"top_p": 1.5},
        {"top_p": -0.2},
        {"top_k": -1},
        {"max_new_tokens": 0},
        {"max_new_tokens": -5},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": 1e-40},
        {"repetition_penalty": 1e3},
        {"seed": -1},
    ],
)
def test_sample_config_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError) as info:
        SampleConfig(**kwargs)
    assert "\n" not in str(info.value) and info.value.setting == next(iter(kwargs))


def test_sample_config_edges_are_accepted() -> None:
    SampleConfig(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=1)
    SampleConfig(top_p=1e-9, top_k=1)
    SampleConfig(top_p=0.0, temperature=2.0, repetition_penalty=0.01)
    SampleConfig(repetition_penalty=100.0)
    # Too small to divide logits by: greedy, which is what such a temperature tends to.
    for tiny in (1e-300, 5e-324, 1e-40, 9.9e-5):
        assert SampleConfig(temperature=tiny).temperature == 0.0
    assert SampleConfig(temperature=1e-4).temperature == 1e-4
