"""Tests for ``minigpt2.fast.int8``: int8 weights for the one-character steps of decoding.

An int8 linear layer must multiply by its quantized weights (and those must be within half a step
of the trained ones); decoding through int8 weights must stay close to fp32 and be what chat,
``sample`` and the batched server run when ``--decode-weights int8`` (or ``auto`` for a large model)
asks for it; sizes the kernel cannot take must be refused in one line. Run with
``pytest tests/fast/test_int8.py``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from helpers_model import all_logits
from minigpt2.core.config import SampleConfig
from minigpt2.core.model import GPT, KVCache
from minigpt2.core.stream import generate_ids, stream_text
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.errors import ConfigError
from minigpt2.fast import speed_up
from minigpt2.fast.batch_decoder import BatchDecoder, generate_many
from minigpt2.fast.decode import Decoder, decoder_for
from minigpt2.fast.int8 import AUTO_MIN_BYTES, Int8Linear, choose_decode_weights, quantize
from minigpt2.hardware.precision import choose_precision
from minigpt2.inference.chatbot import load_for_inference
from minigpt2.storage import checkpoint

Factory = Callable[..., GPT]
Run = Callable[..., subprocess.CompletedProcess[str]]
OneLine = Callable[[subprocess.CompletedProcess[str]], str]


@pytest.mark.parametrize(("n_in", "n_out"), [(32, 7), (48, 96), (128, 65), (384, 1152)])
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_int8_linear_multiplies_by_its_quantized_weights(n_in: int, n_out: int, rows: int) -> None:
    gen = torch.Generator().manual_seed(n_in + rows)
    weight, bias = torch.randn(n_out, n_in, generator=gen), torch.randn(n_out, generator=gen)
    weight[0, 3] = 9.0  # an outlier sets its row's scale; the other rows keep their own
    layer = Int8Linear(weight, bias)
    dequantized = layer.dequantized()
    # Each weight is the nearest multiple of its row's scale (of the rounded scale, to rounding).
    step = layer.scale.float()[:, None]
    assert ((dequantized - weight).abs() <= step / 2 * 1.01).all()
    assert layer.q.abs().max() == 127 and layer.q.dtype == torch.int8
    x = torch.randn(rows, n_in, generator=gen)
    y = layer(x)
    assert y.shape == (rows, n_out) and y.dtype == torch.float32
    # What the kernel computes: the bf16 activations by the dequantized weights, summed in fp32,
    # rounded to bf16, plus the bias.
    expected = x.bfloat16().float() @ dequantized.t()
    torch.testing.assert_close(y - bias, expected, atol=1e-2 * expected.abs().max().item(), rtol=1e-2)


def test_quantize_keeps_a_row_of_zeros_at_zero() -> None:
    q, scale = quantize(torch.zeros(3, 16))
    assert (q == 0).all() and (scale > 0).all()


@pytest.mark.parametrize("n_embd", [32, 64])
def test_int8_steps_stay_close_to_the_fp32_steps(make_model: Factory, n_embd: int) -> None:
    model = make_model(block_size=16, n_head=4, n_embd=n_embd, spread=0.1)
    idx = torch.randint(50, (1, 16), generator=torch.Generator().manual_seed(n_embd))
    with torch.inference_mode():
        full = all_logits(model, idx)  # (1, 16, V): fp32, the model itself
        cache = KVCache(model.config)
        model(idx[:, :4], cache=cache)
        decoder = Decoder(model, "int8")
        steps = torch.stack([decoder.step(int(idx[0, t]), cache) for t in range(4, 16)])
    reference = full[0, 4:16]
    err = (steps - reference).abs().max().item()
    assert 0 < err < 0.02 * reference.abs().max().item()  # different numbers, but close ones
    assert (steps.argmax(1) == reference.argmax(1)).float().mean() >= 0.9


def test_generation_reads_the_weights_the_model_names(make_model: Factory) -> None:
    """``decode_weights`` on a fast model decides the steps' weights: int8 ids are those of the
    int8 decoder stepped by hand."""
    model = speed_up(make_model(block_size=32, n_embd=32, spread=0.3))
    model.decode_weights = "int8"
    cfg = SampleConfig(max_new_tokens=20, temperature=0.0)
    ids = list(generate_ids(model, [1, 2, 3], cfg))
    assert decoder_for(model).weights == "int8"
    decoder = Decoder(model, "int8")
    with torch.inference_mode():
        cache = KVCache(model.config)
        GPT.forward(model, torch.tensor([[1, 2]]), cache=cache)  # the prompt but its last id
        by_hand, token = [], 3
        for _ in range(20):
            logits = decoder.step(token, cache)
            token = int(logits.argmax())
            by_hand.append(token)
    assert ids == by_hand


def test_decoder_for_reuses_its_decoder_until_the_weights_change(make_model: Factory) -> None:
    model = make_model(block_size=8, spread=0.2)
    model.decode_weights = "int8"
    first = decoder_for(model)
    assert decoder_for(model) is first  # no new int8 copy for every prompt
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # a training step, load_state_dict, ... (in place)
    second = decoder_for(model)
    assert second is not first
    idx = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.inference_mode():
        full = all_logits(model, idx)
        cache = KVCache(model.config)
        model(idx[:, :4], cache=cache)
        logits = second.step(5, cache)
    assert (logits - full[0, 4]).abs().max() < 0.05 * full[0, 4].abs().max()  # the new weights
    model.decode_weights = "fp32"
    assert decoder_for(model).weights == "fp32"


def test_batched_rows_with_int8_weights_give_the_ids_of_each_alone(make_model: Factory) -> None:
    model = speed_up(make_model(block_size=16, n_embd=32, spread=0.3))
    model.decode_weights = "int8"
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10], [11, 12]]
    cfg = SampleConfig(max_new_tokens=24, temperature=0.0)  # past the window: rows slide too
    together: list[list[int]] = [[] for _ in prompts]
    for i, token in generate_many(model, prompts, cfg, max_rows=4):
        together[i].append(token)
    alone = [list(generate_ids(model, p, cfg)) for p in prompts]
    assert together == alone


def test_a_prompts_first_logits_are_the_int8_steps_alone_and_in_a_batch(make_model: Factory) -> None:
    """A prompt's last id goes through the int8 step alone (``FastGPT``) as in a batch
    (``BatchDecoder``), so the first id of an answer is drawn from the same numbers in both."""
    model = speed_up(make_model(block_size=16, n_embd=32, spread=0.3))
    model.decode_weights = "int8"
    prompts = [[1, 2, 3, 4, 5], [6], [7, 8]]  # one id only: the step starts the cache itself
    decoder = BatchDecoder(model, max_rows=4)
    rows = [decoder.add(p, SampleConfig(max_new_tokens=3, temperature=0.0)) for p in prompts]
    decoder.step()
    for prompt, row in zip(prompts, rows, strict=True):
        with torch.inference_mode():
            alone = model(torch.tensor([prompt]), cache=KVCache(model.config))[0][0, -1]  # (V,)
            fp32 = GPT.forward(model, torch.tensor([prompt]))[0][0, -1]  # the model's own numbers
        assert row.logits is not None
        torch.testing.assert_close(row.logits, alone, atol=1e-5, rtol=1e-5)
        assert (alone - fp32).abs().max() > 1e-4  # and they are the int8 step's, not the model's


def test_int8_decoding_under_bf16_autocast_alone_and_batched(make_model: Factory) -> None:
    model = speed_up(make_model(block_size=16, n_embd=32, spread=0.3))
    model.decode_weights = "int8"
    precision = choose_precision(torch.device("cpu"), "bf16")
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]]
    cfg = SampleConfig(max_new_tokens=20, temperature=0.0)  # past the window: rows slide too
    together: list[list[int]] = [[] for _ in prompts]
    for i, token in generate_many(model, prompts, cfg, precision=precision, max_rows=3):
        together[i].append(token)
    alone = [list(generate_ids(model, p, cfg, precision=precision)) for p in prompts]
    assert all(len(ids) == 20 for ids in alone)
    # The same ids but for near ties: bf16 rounds a batched product of 3 rows and one of 1 row alike,
    # but its attention sums in another order.
    same = sum(a == b for x, y in zip(together, alone, strict=True) for a, b in zip(x, y, strict=True))
    assert same >= 0.9 * 60


def test_auto_picks_int8_for_a_large_model_on_a_cpu(make_model: Factory) -> None:
    small = make_model(n_embd=32)
    choice = choose_decode_weights(small, "auto")
    assert choice.name == "fp32" and "caches" in choice.reason
    large = make_model(n_layer=2, n_head=4, n_embd=384)  # 2 x 12 x 384^2 x 4 bytes = 13.5 MiB
    assert 4 * sum(p.numel() for p in large.transformer.h.parameters()) >= AUTO_MIN_BYTES
    assert choose_decode_weights(large, "auto").name == "int8"
    assert choose_decode_weights(large, "fp32").name == "fp32"
    assert choose_decode_weights(small, "int8").name == "int8"


def test_int8_is_refused_where_the_kernel_cannot_run(make_model: Factory) -> None:
    odd = make_model(n_head=4, n_embd=36)  # the kernel reads 16 values at a time, with no tail
    with pytest.raises(ConfigError, match="multiple of 16"):
        choose_decode_weights(odd, "int8")
    assert choose_decode_weights(odd, "auto").name == "fp32"
    with pytest.raises(ConfigError, match="auto, int8 or fp32"):
        choose_decode_weights(odd, "int4")


def test_load_for_inference_sets_the_models_decode_weights(
    tmp_path: Path, tok: CharTokenizer, make_model: Factory
) -> None:
    run = tmp_path / "run"
    checkpoint.save(run / "best", make_model(vocab_size=tok.vocab_size, block_size=32), tok, {"step": 0})
    loaded = load_for_inference(run, "cpu", decode_weights="int8")
    assert loaded.model.decode_weights == loaded.decode_weights.name == "int8"
    assert load_for_inference(run, "cpu").model.decode_weights == "fp32"  # auto: a tiny model
    # Whole windows (eval) and the textbook model read no one-character steps' weights.
    whole_windows = load_for_inference(run, "cpu", generation=False, decode_weights="auto")
    assert whole_windows.decode_weights.name == "fp32"
    with pytest.raises(ConfigError, match="fast engine"):
        load_for_inference(run, "cpu", engine="reference", decode_weights="int8")


def test_cli_decode_weights(cli: Run, one_line_error: OneLine, saved_run: Path) -> None:
    """``sample --decode-weights`` prints what the library generates with those weights, and the
    two differ for this model and seed (so the flag is not ignored)."""
    args = ["--prompt", "ab", "--seed", "1", "--max-new-tokens", "200", "--temperature", "1"]
    printed = {}
    for weights in ("int8", "fp32"):
        result = cli("sample", saved_run, *args, "--decode-weights", weights)
        assert result.returncode == 0, result.stderr
        loaded = load_for_inference(saved_run, "cpu", "fp32", decode_weights=weights)
        pieces = stream_text(loaded.model, loaded.tokenizer, "ab", SampleConfig(max_new_tokens=200, seed=1,
                             temperature=1.0), stop_ids=())  # fmt: skip
        assert result.stdout == "ab" + "".join(pieces) + "\n"
        printed[weights] = result.stdout
    assert printed["int8"] != printed["fp32"]
    textbook = ["--decode-weights", "int8", "--engine", "reference"]
    line = one_line_error(cli("sample", saved_run, *args, *textbook))
    assert "--decode-weights int8" in line
    assert "--decode-weights" not in cli("eval", "--help").stdout  # eval scores whole windows
