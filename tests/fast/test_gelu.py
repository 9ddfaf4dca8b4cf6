"""Tests for the engine's compiled GELU (``minigpt2.fast.gelu``): it computes GPT-2's GELU.

``CompiledGELU`` is GPT-2's tanh GELU (bf16: within bf16 rounding of float64; fp32: within fp32
rounding of ``F.gelu``) and falls back to ``F.gelu`` when compiling fails; ``CompiledGELUMLP``, which
hands the loop ``c_fc``'s bias, is the textbook MLP (fp32: output and every gradient to rounding;
bf16 autocast: within bf16 rounding); the loop is not used in a model being compiled; a process
restricted to AVX2 keeps its compiled code out of the caches an unrestricted one reads. Run with
``pytest tests/fast/test_gelu.py``.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from helpers_model import assert_same_function
from helpers_train import corpus_text, subprocess_env
from minigpt2.core.config import ModelConfig
from minigpt2.core.model import MLP
from minigpt2.fast import gelu as gelu_module
from minigpt2.fast import speed_up
from minigpt2.fast.gelu import CompiledGELU, CompiledGELUMLP, gelu_tanh_via_sigmoid

SHAPE = dict(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=64)


def _spy_on_the_loop(
    monkeypatch: pytest.MonkeyPatch, compiler_works: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The arguments of every call of the compiled loop from now on, which is used on any tensor
    (``COMPILED_MIN_NUMEL`` 1); without ``compiler_works`` each call fails as a missing compiler does."""
    monkeypatch.setattr(CompiledGELU, "COMPILED_MIN_NUMEL", 1)
    monkeypatch.setattr(CompiledGELU, "broken", False)
    calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    real = gelu_module._compiled_gelu

    def spying() -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        def run(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            calls.append((x, bias))
            if not compiler_works:
                raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
            return real()(x, bias)

        return run

    monkeypatch.setattr(gelu_module, "_compiled_gelu", spying)
    return calls


def _mlps() -> tuple[MLP, MLP]:
    """(textbook, drop-in) MLPs with the same weights, in training."""
    torch.manual_seed(0)
    plain = MLP(ModelConfig(**SHAPE)).train()  # type: ignore[arg-type]
    tuned = MLP(ModelConfig(**SHAPE)).train()  # type: ignore[arg-type]
    tuned.load_state_dict(plain.state_dict())
    speed_up(tuned)  # type: ignore[arg-type]
    return plain, tuned


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

    calls = []
    real = gelu_module._compiled_gelu

    def counting() -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        calls.append(1)
        return real()

    monkeypatch.setattr(gelu_module, "_compiled_gelu", counting)
    monkeypatch.setattr(CompiledGELU, "broken", False)
    torch.manual_seed(0)
    # Values from -12 to 12 (tails, where GELU is ~0 or ~x) and a dense middle; an odd size, above
    # the size where the compiled loop is used.
    n_random = CompiledGELU.COMPILED_MIN_NUMEL - 20_001 + 1_011
    x = torch.cat([torch.linspace(-12, 12, 20_001), torch.randn(n_random) * 2]).bfloat16()
    x.requires_grad_()
    fast = CompiledGELU().train()
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
    assert torch.equal(torch.nn.GELU(approximate="tanh").train()(x.detach()), expected)
    assert not calls


@pytest.mark.parametrize("compiler_works", [True, False])
def test_compiled_gelu_mlp_equals_the_textbook_mlp(
    compiler_works: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MLP whose c_fc bias is added in the compiled GELU's loop: the textbook MLP's output and
    gradients (input, and every parameter: c_fc's bias included) in fp32, and the same when
    compiling fails and the GELU falls back to ``F.gelu``."""
    calls = _spy_on_the_loop(monkeypatch, compiler_works)
    plain, tuned = _mlps()
    assert type(tuned) is CompiledGELUMLP and type(plain) is MLP
    assert_same_function(tuned, plain, torch.randn(3, 7, 64))
    assert calls and calls[0][1] is tuned.c_fc.bias
    assert CompiledGELU.broken is not compiler_works


def test_compiled_gelu_mlp_under_bf16_autocast_stays_within_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under autocast the loop gets c_fc's bf16 product and its fp32 bias: output, input gradient
    and c_fc's bias gradient within bf16 rounding of the fp32 textbook MLP."""
    calls = _spy_on_the_loop(monkeypatch)
    plain, tuned = _mlps()
    x = torch.randn(4, 16, 64, requires_grad=True)
    twin = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = tuned(x)
    expected = plain(twin)
    inputs = [(x.dtype, None if bias is None else bias.dtype) for x, bias in calls]
    assert inputs == [(torch.bfloat16, torch.float32)] and got.dtype == torch.bfloat16
    assert ((got.float() - expected).norm() / expected.norm()) < 0.02
    weights = torch.randn_like(expected)
    (got.float() * weights).sum().backward()
    (expected * weights).sum().backward()
    for got_grad, expected_grad in ((x.grad, twin.grad), (tuned.c_fc.bias.grad, plain.c_fc.bias.grad)):
        assert got_grad is not None and expected_grad is not None
        assert ((got_grad.float() - expected_grad).norm() / expected_grad.norm()) < 0.05


def test_compiled_gelu_stays_out_of_a_model_being_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside ``torch.compile``'s tracing (which fuses the textbook's GELU itself) neither drop-in
    calls the compiled loop: the textbook's numbers."""
    monkeypatch.setattr(CompiledGELU, "COMPILED_MIN_NUMEL", 1)
    monkeypatch.setattr(gelu_module, "_compiled_gelu", lambda: pytest.fail("compiled loop called"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    plain, tuned = _mlps()
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(tuned(x), plain(x))


def test_gelu_falls_back_to_f_gelu_when_compiling_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:

    def no_compiler() -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        def fail(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

        return fail

    monkeypatch.setattr(gelu_module, "_compiled_gelu", no_compiler)
    monkeypatch.setattr(CompiledGELU, "broken", False)
    x = torch.randn(CompiledGELU.COMPILED_MIN_NUMEL).bfloat16()
    with caplog.at_level("WARNING", logger="minigpt2.fast.gelu"):
        y = CompiledGELU().train()(x)
    assert torch.equal(y, torch.nn.functional.gelu(x, approximate="tanh"))
    assert (
        CompiledGELU.broken
        and "No working C++ compiler found" in caplog.text
        and "more detail" not in caplog.text
    )


def test_a_gelu_compiled_under_a_restricted_instruction_set_never_reaches_an_unrestricted_process(
    tmp_path: Path,
) -> None:
    """PyTorch's compile caches do not key on ATEN_CPU_CAPABILITY: the C++ a process restricted to
    AVX2 generated (as ``make test`` runs the numeric tests) was found by the next, unrestricted
    process and compiled for AVX-512, which wrote past its buffers ("free(): invalid pointer" in
    the next training). A restricted process now keeps out of those caches; then an unrestricted
    training in the same cache folder runs. Only an AVX-512 CPU can be restricted to show it."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("needs an AVX-512 CPU, whose PyTorch can be restricted to AVX2")
    from minigpt2 import data

    text = tmp_path / "t.txt"
    text.write_text(corpus_text(n_lines=800), encoding="utf-8")
    data.prepare(str(text), tmp_path / "d", block_size=128)
    cache = tmp_path / "inductor"
    base = {**subprocess_env(), "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):
        base.pop(name, None)
    restricted = {**base, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                  "MKL_ENABLE_INSTRUCTIONS": "AVX2"}  # fmt: skip
    for number, env in enumerate((restricted, base)):  # the restricted process first
        # The chat preset's shape: a GELU of 32 x 128 x 1024, large enough to be compiled.
        argv = ["train", "--data", tmp_path / "d", "--out", tmp_path / f"run{number}", "--preset", "chat",
                "--max-iters", 2, "--eval-interval", 100, "--no-samples", "--dtype", "fp32"]  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "minigpt2", *map(str, argv)], env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert "compiled GELU failed" not in done.stderr  # compiled, not the F.gelu fallback
        if env is restricted:  # nothing it compiled can be found by graph: only content-named files
            assert not any(
                (cache / kind).rglob("*") for kind in ("fxgraph", "aotautograd") if (cache / kind).is_dir()
            )
