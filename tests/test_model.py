"""Tests for ``minigpt2.core.model``: GPT-2's shapes, initialisation, weight tying, attention and KV cache.

Covers output shapes, the initial loss (about ln V), the tied LM head, manual vs sdpa attention,
cached vs full forward passes, the context-window limit, GPT-2's residual-projection init and
Hugging Face parameter names. Tiny CPU models only. Run with ``pytest tests/test_model.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from minigpt2.core.config import ModelConfig
from minigpt2.core.model import GPT, KVCache, causal_bias, causal_mask

Factory = Callable[..., GPT]


def test_output_shapes_and_loss(make_model: Factory) -> None:
    model = make_model(vocab_size=50, block_size=16)
    idx = torch.randint(50, (3, 11))
    logits, loss = model(idx)
    assert logits.shape == (3, 11, 50)
    assert loss is None
    logits, loss = model(idx, targets=idx)
    assert loss is not None and loss.ndim == 0 and torch.isfinite(loss)


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
    logits, _ = model(idx)
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
    torch.testing.assert_close(manual(idx)[0], sdpa(idx)[0], atol=1e-5, rtol=1e-5)


def test_causal_bias_is_the_mask_as_an_addition() -> None:
    for T, Tk in ((4, 4), (2, 5), (1, 3)):
        bias = causal_bias(T, Tk, torch.bfloat16, torch.device("cpu"))
        assert bias.dtype == torch.bfloat16
        assert torch.equal(bias == 0, causal_mask(T, Tk, torch.device("cpu")))
        assert torch.equal(bias != 0, bias == float("-inf"))


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
    torch.testing.assert_close(model(idx)[0][:, :8], model(changed)[0][:, :8])
    assert not torch.allclose(model(idx)[0][:, 8:], model(changed)[0][:, 8:])


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
@pytest.mark.parametrize("prefill", [1, 5, 16])
def test_kv_cache_matches_full_forward(make_model: Factory, attn_impl: str, prefill: int) -> None:
    model = make_model(attn_impl=attn_impl, block_size=16, spread=0.2)
    idx = torch.randint(50, (2, 16))
    full, _ = model(idx)
    cache = KVCache(model.config, batch_size=2)
    pieces = [model(idx[:, :prefill], cache=cache)[0]]
    for t in range(prefill, 16):
        pieces.append(model(idx[:, t : t + 1], cache=cache)[0])
    assert cache.pos == 16
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_kv_cache_chunks_and_reset(make_model: Factory, attn_impl: str) -> None:
    model = make_model(attn_impl=attn_impl, spread=0.2)
    idx = torch.randint(50, (1, 12))
    full, _ = model(idx)
    cache = KVCache(model.config)
    chunked = torch.cat([model(idx[:, :4], cache=cache)[0], model(idx[:, 4:12], cache=cache)[0]], dim=1)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    cache.reset()
    assert cache.pos == 0
    torch.testing.assert_close(model(idx[:, :6], cache=cache)[0], full[:, :6], atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_fast_cpu_dropout_is_dropout(p: float) -> None:
    """The ``auto`` path's CPU dropout zeroes a share p of elements and keeps the mean (scaling)."""
    from minigpt2.core.model import Dropout

    torch.manual_seed(0)
    drop = Dropout(p, fast=True).train()
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
    a = Dropout(p, fast=True).train()(x)
    torch.manual_seed(1)
    assert torch.equal(Dropout(p, fast=True).train()(x), a)  # seeded: same mask
    assert not torch.equal(Dropout(p, fast=True).train()(x), a)  # and a new mask on each call


@pytest.mark.parametrize("p", [1e-7, 0.9999999])
def test_fast_cpu_dropout_takes_any_p_in_range(p: float) -> None:
    """A p too close to 0 or 1 for 16-bit steps still works (the nearest step: 1/65536 from the end)."""
    from minigpt2.core.model import Dropout

    zeroed = (Dropout(p, fast=True).train()(torch.ones(100_000)) == 0).float().mean().item()
    assert abs(zeroed - p) < 0.001


def test_a_batch_without_targets_has_zero_loss_not_nan() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=20, block_size=8, n_layer=1, n_head=1, n_embd=8))
    idx = torch.randint(0, 20, (2, 8))
    _, loss = model(idx, torch.full((2, 8), -1))
    assert loss is not None and loss.item() == 0.0
    targets = torch.randint(0, 20, (2, 8))
    targets[0] = -1
    _, masked = model(idx, targets)
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[1].float(), targets[1])
    assert masked is not None and torch.allclose(masked, expected)


def test_fast_cpu_training_path_agrees_with_the_reference_within_bf16() -> None:
    """The default CPU training path (bf16 autocast; ``attn_impl="auto"``: the manual attention in
    bf16 with a bf16 softmax) against the readable reference (fp32, manual attention): the same loss
    and gradients within bf16 rounding (dropout 0, so both are deterministic)."""
    torch.manual_seed(0)
    shape = dict(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0)
    fast = GPT(ModelConfig(**shape, attn_impl="auto")).train()
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


def _gpt2_gelu_fp64(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh GELU in float64: the exact values to measure both bf16 versions against."""
    x = x.double()
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def test_compiled_gelu_is_gpt2s_tanh_gelu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast CPU training path's GELU (compiled ``x * sigmoid(2z)``): in bf16, forward and
    backward within bf16 rounding of GPT-2's GELU computed in float64 everywhere, and equal to
    ``F.gelu(tanh)`` above x = -2.9 (below, where GELU is under 0.006 in size, F.gelu's bf16 result
    loses digits to the cancellation in ``1 + tanh(z)``: up to all of them, where this form keeps
    bf16 rounding); in fp32, equal to F.gelu within fp32 rounding. Tensors too small for the
    compiled call to pay, eval mode and the reference path use ``F.gelu`` itself."""
    from torch.nn.functional import gelu

    import minigpt2.core.model as model_module
    from minigpt2.core.model import GELU, gelu_tanh_via_sigmoid

    calls = []
    real = model_module._compiled_gelu

    def counting() -> Callable[[torch.Tensor], torch.Tensor]:
        calls.append(1)
        return real()

    monkeypatch.setattr(model_module, "_compiled_gelu", counting)
    monkeypatch.setattr(GELU, "broken", False)
    torch.manual_seed(0)
    # Values from -12 to 12 (tails, where GELU is ~0 or ~x) and a dense middle; an odd size, above
    # the size where the compiled loop is used.
    n_random = GELU.COMPILED_MIN_NUMEL - 20_001 + 1_011
    x = torch.cat([torch.linspace(-12, 12, 20_001), torch.randn(n_random) * 2]).bfloat16()
    x.requires_grad_()
    fast = GELU(fast=True).train()
    y = fast(x)
    assert calls, "the compiled GELU was not used"
    exact = _gpt2_gelu_fp64(x.detach())
    bf16_rounding = exact.abs() * 2**-8 + 1e-6  # a bf16 step is 2^-8 to 2^-7 of the value
    assert ((y.detach().double() - exact).abs() <= bf16_rounding).all()
    expected = gelu(x.detach(), approximate="tanh")
    assert (y.detach() != expected)[x.detach() > -2.9].float().mean() < 1e-4
    grad_out = torch.randn(x.shape).bfloat16()
    (grad,) = torch.autograd.grad(y, x, grad_out)
    x64 = x.detach().double().requires_grad_()
    (grad_exact,) = torch.autograd.grad(_gpt2_gelu_fp64(x64), x64, grad_out.double())
    assert ((grad.double() - grad_exact).abs() <= grad_exact.abs() * 2**-7 + 1e-5).all()
    # fp32: compiled too, within fp32 rounding of F.gelu, forward and backward.
    xf = x.detach().float().requires_grad_()
    calls.clear()
    yf = fast(xf)
    assert calls, "the compiled GELU was not used in fp32"
    torch.testing.assert_close(yf, gelu(xf.detach(), approximate="tanh"), atol=2e-6, rtol=1e-6)
    (grad_f,) = torch.autograd.grad(yf, xf, grad_out.float())
    xr = xf.detach().requires_grad_()
    (grad_ref,) = torch.autograd.grad(gelu(xr, approximate="tanh"), xr, grad_out.float())
    torch.testing.assert_close(grad_f, grad_ref, atol=1e-5, rtol=1e-5)
    # A small tensor, eval mode, the reference: F.gelu exactly.
    small = torch.linspace(-12, 12, 1001)
    torch.testing.assert_close(
        gelu_tanh_via_sigmoid(small), gelu(small, approximate="tanh"), atol=2e-6, rtol=0
    )
    calls.clear()
    assert torch.equal(fast(small), gelu(small, approximate="tanh"))
    assert torch.equal(fast.eval()(x.detach()), expected)
    assert torch.equal(GELU(fast=False).train()(x.detach()), expected)
    assert not calls


def test_gelu_falls_back_to_f_gelu_when_compiling_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import minigpt2.core.model as model_module
    from minigpt2.core.model import GELU

    def no_compiler() -> Callable[[torch.Tensor], torch.Tensor]:
        def fail(x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

        return fail

    monkeypatch.setattr(model_module, "_compiled_gelu", no_compiler)
    monkeypatch.setattr(GELU, "broken", False)
    x = torch.randn(GELU.COMPILED_MIN_NUMEL).bfloat16()
    with caplog.at_level("WARNING", logger="minigpt2.core.model"):
        y = GELU(fast=True).train()(x)
    assert torch.equal(y, torch.nn.functional.gelu(x, approximate="tanh"))
    assert GELU.broken and "No working C++ compiler found" in caplog.text and "more detail" not in caplog.text
