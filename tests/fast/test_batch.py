"""Tests for ``minigpt2.fast.batch_decoder``: many rows in one batched step against ``generate_ids`` alone.

What is checked: each row's ids equal ``generate_ids`` run alone on the textbook model (greedy, and
seeded sampling), for rows with different prompt lengths, rows that slide past the window, and rows
with different stop ids, ``min_new_tokens``, max tokens and sampling options; the logits each id is
drawn from equal the textbook model's, cache-free, at that window (fp32: within 1e-4 + 1e-5
relative on logits of a few units, the rounding of another summation order; bf16 autocast: within
bf16 tolerance); a cancelled row leaves before the next step and its slot is reused. Models are
tiny with widened random weights (``spread``) and the layer norms GPT starts with (scale 1, shift
0): a random shift before the head favours one id whatever the context, and greedy rows would all
repeat it.
Run with ``pytest tests/fast/test_batch.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import pytest
import torch

from helpers_model import all_logits
from minigpt2.core.config import SampleConfig
from minigpt2.core.generate import make_generator, sample
from minigpt2.core.model import GPT
from minigpt2.core.stream import first_window, generate_ids, slid_window
from minigpt2.fast import speed_up
from minigpt2.fast.batch_decoder import BatchDecoder, Row, draw_together, generate_many
from minigpt2.hardware.precision import Precision

Factory = Callable[..., GPT]
GREEDY = SampleConfig(max_new_tokens=40, temperature=0.0)


@pytest.fixture
def varied(make_model: Factory) -> Factory:
    """``make_model`` whose next ids depend on the context: weights widened to ``spread`` (0.5
    unless given), layer norms reset to the identity."""

    def factory(spread: float = 0.5, **kw: object) -> GPT:
        model = make_model(spread=spread, **kw)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.weight.fill_(1.0)
                    module.bias.zero_()
        return model

    return factory


def prompts_of(lengths: Sequence[int], vocab: int = 50) -> list[list[int]]:
    g = torch.Generator().manual_seed(len(lengths))
    return [torch.randint(vocab, (n,), generator=g).tolist() for n in lengths]


def alone(
    model: GPT,
    prompt: list[int],
    cfg: SampleConfig,
    *,
    stop_ids: Iterable[int] = (),
    min_new_tokens: int = 0,
    generator: torch.Generator | None = None,
) -> list[int]:
    return list(generate_ids(model, prompt, cfg, stop_ids=stop_ids, min_new_tokens=min_new_tokens,
                             generator=generator))  # fmt: skip


def run_all(decoder: BatchDecoder) -> None:
    while decoder.rows:
        decoder.step()


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_greedy_rows_equal_generate_ids_alone(varied: Factory, attn_impl: str) -> None:
    # Window 16: prompts shorter than it, as long, and longer; 40 ids slide each row 4-5 times.
    model = varied(block_size=16, attn_impl=attn_impl)
    prompts = prompts_of([1, 2, 5, 9, 15, 16, 23])
    decoder = BatchDecoder(model, max_rows=8)
    rows = [decoder.add(p, GREEDY) for p in prompts]
    run_all(decoder)
    for row, prompt in zip(rows, prompts, strict=True):
        assert row.new_ids == alone(model, prompt, GREEDY)
        assert row.finish_reason == "length" and len(row.new_ids) == 40


def test_generate_many_queues_prompts_beyond_max_rows(varied: Factory) -> None:
    model = speed_up(varied(block_size=16))  # the engine's model prefills the same
    prompts = prompts_of([3, 8, 1, 12, 6, 20, 4])
    cfgs = [SampleConfig(max_new_tokens=5 + 4 * i, temperature=0.0) for i in range(len(prompts))]
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    for i, nxt in generate_many(model, prompts, cfgs, max_rows=3):
        got[i].append(nxt)
    assert got == {i: alone(model, p, c) for i, (p, c) in enumerate(zip(prompts, cfgs, strict=True))}


def test_a_seeded_sampled_row_is_the_same_alone_and_among_20_others(varied: Factory) -> None:
    model = varied(block_size=16)
    cfg = SampleConfig(
        max_new_tokens=50, temperature=0.9, top_k=12, top_p=0.9, repetition_penalty=1.3, seed=7
    )
    prompt = [4, 8, 15, 16, 23, 42]
    single = BatchDecoder(model, max_rows=1)
    row = single.add(prompt, cfg)
    run_all(single)
    crowd = BatchDecoder(model, max_rows=21)
    others = prompts_of(range(1, 21))
    # Others join before it and while it runs, with their own options and seeds.
    for i, p in enumerate(others[:12]):
        crowd.add(p, SampleConfig(max_new_tokens=10 + 3 * i, temperature=0.5 + i / 10, top_k=i, seed=i))
    ours = crowd.add(prompt, cfg)
    for i, p in enumerate(others[12:]):
        crowd.step()
        crowd.add(p, SampleConfig(max_new_tokens=30, temperature=1.2, top_p=0.8, seed=100 + i))
    run_all(crowd)
    assert len(row.new_ids) == 50
    assert ours.new_ids == row.new_ids == alone(model, prompt, cfg)


@pytest.mark.parametrize(("temperature", "top_k"), [(0.0, 0), (0.7, 40), (1.0, 0), (1.3, 3)])
def test_a_draw_together_is_each_rows_draw_alone(temperature: float, top_k: int) -> None:
    """``draw_together`` gives each row the id ``sample`` draws from it alone with the same
    generator, and leaves each generator where ``sample`` leaves it."""
    logits = torch.randn(64, 65, generator=torch.Generator().manual_seed(top_k)) * 3  # (B, V)
    together_gens = [make_generator(seed) for seed in range(64)]
    alone_gens = [make_generator(seed) for seed in range(64)]
    together = draw_together(logits, temperature, top_k, together_gens)
    assert together == [
        sample(row, temperature, top_k, 1.0, g) for row, g in zip(logits, alone_gens, strict=True)
    ]
    assert [g.get_state().equal(h.get_state()) for g, h in zip(together_gens, alone_gens, strict=True)] == [
        True
    ] * 64


def test_twenty_rows_drawn_together_are_each_the_same_alone(varied: Factory) -> None:
    model = varied(block_size=16)
    cfg = SampleConfig(max_new_tokens=30, temperature=0.8, top_k=10)  # the same options, other seeds
    prompts = prompts_of(range(1, 21))
    generators = [make_generator(100 + i) for i in range(20)]
    together: list[list[int]] = [[] for _ in prompts]
    for i, token in generate_many(model, prompts, cfg, generators=generators, max_rows=20):
        together[i].append(token)
    assert together == [
        list(generate_ids(model, p, cfg, generator=make_generator(100 + i))) for i, p in enumerate(prompts)
    ]


def test_rows_keep_their_own_stop_ids_max_tokens_and_options(varied: Factory) -> None:
    model = varied(block_size=16)
    prompts = prompts_of([3, 7, 11, 2])
    free_runs = [alone(model, p, GREEDY) for p in prompts]
    # Row 0's first free-running id is a stop id, which min_new_tokens keeps it from drawing at once;
    # row 1 stops early on its own id; row 2 samples with a penalty to its own length; row 3 runs
    # greedy to a different length with the others' stop ids not its own.
    cases = [
        (SampleConfig(max_new_tokens=40, temperature=0.0), {free_runs[0][0], free_runs[0][6]}, 3),
        (SampleConfig(max_new_tokens=40, temperature=0.0), {free_runs[1][2], 0}, 0),
        (SampleConfig(max_new_tokens=17, temperature=0.7, repetition_penalty=1.5, seed=3), set(), 0),
        (SampleConfig(max_new_tokens=23, temperature=0.0), set(), 0),
    ]
    decoder = BatchDecoder(model, max_rows=4)
    rows = [
        decoder.add(p, c, stop_ids=s, min_new_tokens=m) for p, (c, s, m) in zip(prompts, cases, strict=True)
    ]
    ended_at: dict[int, int] = {}
    step = 0
    while decoder.rows:
        step += 1
        for row, nxt in decoder.step():
            assert row.finished == (nxt is None or len(row.new_ids) == row.cfg.max_new_tokens)
            if row.finished:
                assert row not in decoder.rows  # it left at once
                ended_at[row.number] = step
    for row, prompt, (cfg, stops, least) in zip(rows, prompts, cases, strict=True):
        assert row.new_ids == alone(model, prompt, cfg, stop_ids=stops, min_new_tokens=least)
        assert ended_at[row.number] == len(row.new_ids) + (row.finish_reason == "stop")
    assert [r.finish_reason for r in rows] == ["stop", "stop", "length", "length"]
    assert [len(r.new_ids) for r in rows[2:]] == [17, 23]
    assert len(rows[0].new_ids) >= 3 and rows[0].new_ids[0] != free_runs[0][0]


def test_a_cancelled_row_frees_its_slot_for_a_new_row(varied: Factory) -> None:
    model = varied(block_size=16)
    a, b, c, d = prompts_of([4, 9, 13, 6])
    decoder = BatchDecoder(model, max_rows=3)
    rows = [decoder.add(p, GREEDY) for p in (a, b, c)]
    with pytest.raises(RuntimeError, match="busy"):
        decoder.add(d, GREEDY)
    for _ in range(5):
        decoder.step()
    decoder.cancel(rows[0])
    # It left at once: the last row took its slot, and one slot is free.
    assert rows[0].finish_reason == "cancelled" and rows[0].slot == -1
    assert decoder.rows == [rows[2], rows[1]] and [r.slot for r in decoder.rows] == [0, 1]
    assert decoder.free == 1
    events = decoder.step()
    assert rows[0] not in [r for r, _ in events] and len(rows[0].new_ids) == 5
    new = decoder.add(d, GREEDY)
    assert new.slot == 2
    run_all(decoder)
    # The moved row continued from its own cache; the new row started from a clean one.
    assert [r.new_ids for r in (rows[1], rows[2], new)] == [alone(model, p, GREEDY) for p in (b, c, d)]


def expected_logits(model: GPT, row: Row) -> torch.Tensor:
    """(n, V): the textbook model's logits, cache-free, at the window each of ``row``'s ids was
    drawn from (the window slides as ``generate_ids``'s does)."""
    block = model.config.block_size
    start = first_window(row.prompt_len, block)
    out = []
    for end in range(row.prompt_len, len(row.tokens) + (row.finish_reason == "stop")):
        start = slid_window(end, start, block)
        out.append(all_logits(model, torch.tensor([row.tokens[start:end]]))[0, -1])
    return torch.stack(out)


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
@pytest.mark.parametrize("n_embd", [32, 36])  # head sizes 8 and 9
def test_fp32_logits_equal_the_textbook_model(varied: Factory, attn_impl: str, n_embd: int) -> None:
    """Every id of every row is drawn from the textbook model's logits at its window (to fp32 rounding)."""
    model = varied(block_size=16, n_head=4, n_embd=n_embd, attn_impl=attn_impl)
    decoder = BatchDecoder(model, max_rows=5)
    rows = [decoder.add(p, GREEDY) for p in prompts_of([1, 6, 14, 16, 30])]
    seen: dict[int, list[torch.Tensor]] = {r.number: [] for r in rows}
    while decoder.rows:
        for row, _ in decoder.step():
            assert row.logits is not None
            seen[row.number].append(row.logits)
    with torch.inference_mode():
        for row in rows:
            torch.testing.assert_close(torch.stack(seen[row.number]), expected_logits(model, row),
                                       atol=1e-4, rtol=1e-5)  # fmt: skip


def test_bf16_autocast_follows_the_model_under_autocast(varied: Factory) -> None:
    model = varied(block_size=16, spread=0.1)
    bf16 = Precision(torch.device("cpu"), "bf16", "test")
    decoder = BatchDecoder(model, max_rows=3, precision=bf16)
    cfg = SampleConfig(max_new_tokens=20, temperature=0.0)
    rows = [decoder.add(p, cfg) for p in prompts_of([2, 9, 15])]
    seen: dict[int, list[torch.Tensor]] = {r.number: [] for r in rows}
    while decoder.rows:
        for row, _ in decoder.step():
            assert row.logits is not None
            seen[row.number].append(row.logits)
    assert decoder.batch.kv is not None and decoder.batch.kv.dtype == torch.bfloat16
    with torch.inference_mode():
        for row in rows:
            # bf16 products against the fp32 textbook: the tolerance test_decode uses for bf16.
            reference = expected_logits(model, row)
            torch.testing.assert_close(torch.stack(seen[row.number]), reference, atol=0.1, rtol=0.05)


def test_n_choices_are_one_prompt_with_different_generators(varied: Factory) -> None:
    model = varied(block_size=16)
    prompt, cfg = [1, 2, 3], SampleConfig(max_new_tokens=30, temperature=1.0)
    got: dict[int, list[int]] = {i: [] for i in range(4)}
    gens = [make_generator(10 + i) for i in range(4)]
    for i, nxt in generate_many(model, [prompt] * 4, cfg, generators=gens):
        got[i].append(nxt)
    assert len({tuple(ids) for ids in got.values()}) == 4  # four different answers
    assert all(got[i] == alone(model, prompt, cfg, generator=make_generator(10 + i)) for i in range(4))


def test_refuses_an_empty_prompt_and_mismatched_options(make_model: Factory) -> None:
    model = make_model()
    with pytest.raises(ValueError, match="at least one prompt id"):
        BatchDecoder(model).add([], GREEDY)
    with pytest.raises(ValueError, match="sample configs"):
        list(generate_many(model, [[1], [2]], [GREEDY]))
    assert BatchDecoder(model).step() == []


def test_a_row_whose_draw_fails_leaves_alone_and_the_others_go_on(varied: Factory) -> None:
    model = varied(block_size=16)
    prompts = prompts_of([3, 7, 5])
    seeded = SampleConfig(max_new_tokens=12, temperature=0.9, seed=4)
    decoder = BatchDecoder(model, max_rows=3)
    rows = [decoder.add(p, c) for p, c in zip(prompts, (GREEDY, seeded, seeded), strict=True)]
    # Past the checks of SampleConfig (a config changed after it was made): NaN probabilities.
    broken = SampleConfig(max_new_tokens=12, temperature=0.9, top_p=0.5, seed=4)
    broken.temperature = 1e-300
    rows[2].cfg = broken
    events = decoder.step()
    assert (rows[2], None) in events and rows[2].finish_reason == "error"
    assert isinstance(rows[2].error, RuntimeError) and decoder.rows == [rows[0], rows[1]]
    while decoder.rows:
        decoder.step()
    assert rows[0].new_ids == alone(model, prompts[0], GREEDY)
    assert rows[1].new_ids == alone(model, prompts[1], seeded)


def test_rows_whose_logits_hold_nan_fail_alone(varied: Factory) -> None:
    model = varied(block_size=16)
    decoder = BatchDecoder(model, max_rows=2)
    rows = [decoder.add(p, GREEDY) for p in prompts_of([3, 4])]
    logits = torch.randn(2, model.config.vocab_size)
    logits[1, 5] = float("nan")
    drawn = decoder._draw_all(rows, logits)
    assert drawn[0] == int(logits[0].argmax()) and isinstance(drawn[1], Exception)
    assert "not a number" in str(drawn[1])


def test_sample_refuses_nan_logits_and_keeps_the_likeliest_for_any_top_p() -> None:
    from minigpt2.errors import UserError

    logits = torch.tensor([0.5, 2.0, -1.0, 1.0])
    for p in (0.0, 1e-46, 1e-9):
        assert sample(logits, 1.0, 0, p, make_generator(0)) == 1
    with pytest.raises(UserError, match="not a number"):
        sample(torch.tensor([0.5, float("nan")]), 1.0, 0, 1.0, make_generator(0))
