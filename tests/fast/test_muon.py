"""Tests for the engine's Muon (``fast/muon.py``): it computes what the textbook's Muon computes.

Covered: ``gram_orthogonalize`` equals ``core.muon.orthogonalize`` (fp32, wide and tall matrices,
singular values spread over four orders of magnitude, rank-deficient updates, any number of
iterations) to a tolerance far above fp32 rounding on any CPU and far below what an optimizer
notices; ``GramMuon`` steps match ``Muon`` steps, and take the textbook's path bit for bit on square
matrices and in bf16; ``use_optimizer_engine`` swaps the class both ways inside the Muon + AdamW
pair and keeps the state; a training run's optimizer is the engine's with ``engine="fast"`` and the
textbook's with ``"reference"``. Run with ``pytest tests/fast/test_muon.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers_train import prepare, tiny, trainer
from minigpt2.core.model import GPT
from minigpt2.core.muon import Muon, orthogonalize
from minigpt2.core.optim import make_optimizer
from minigpt2.fast import use_optimizer_engine
from minigpt2.fast.muon import GramMuon, gram_orthogonalize

# The Gram iteration's fp32 rounding grows with the spread of the singular values: up to 1.1e-3 of
# the largest entry (six orders of magnitude), against the textbook's 3e-5 and bf16 Muon's 6e-2 or
# more. 5e-3 leaves room for any CPU's summation order; a wrong product is off by far more.
TOLERANCE = 5e-3


def _spread(shape: tuple[int, int, int], smallest: float, rank: int | None = None) -> torch.Tensor:
    """A stack of matrices with singular values from 1 down to ``smallest`` (zero past ``rank``)."""
    u, _, vh = torch.linalg.svd(torch.randn(shape, dtype=torch.float64), full_matrices=False)
    s = torch.logspace(0, torch.log10(torch.tensor(smallest)).item(), u.size(-1), dtype=torch.float64)
    if rank is not None:
        s[rank:] = 0
    return (u @ torch.diag_embed(s.expand(shape[0], -1)) @ vh).float()


@pytest.mark.parametrize("shape", [(4, 32, 128), (4, 128, 32), (2, 24, 72), (3, 96, 48), (1, 16, 40)])
@pytest.mark.parametrize("smallest", [1.0, 1e-2, 1e-4])
def test_gram_orthogonalize_is_the_textbook_orthogonalize(
    shape: tuple[int, int, int], smallest: float
) -> None:
    torch.manual_seed(0)
    g = _spread(shape, smallest) * 3.7  # any scale: both divide by the norm
    expected = orthogonalize(g.double(), dtype=torch.float64)
    got = gram_orthogonalize(g)
    assert got.shape == g.shape and got.dtype == torch.float32
    assert (got.double() - expected).abs().max() < TOLERANCE * expected.abs().max()


@pytest.mark.parametrize("steps", [0, 1, 2, 5, 7])
def test_gram_orthogonalize_takes_any_number_of_iterations(steps: int) -> None:
    torch.manual_seed(1)
    g = _spread((2, 16, 64), 1e-2, rank=10)  # rank-deficient: zero singular values stay zero
    expected = orthogonalize(g.double(), steps, dtype=torch.float64)
    got = gram_orthogonalize(g, steps)
    assert (got.double() - expected).abs().max() < TOLERANCE * expected.abs().max()
    assert torch.linalg.matrix_rank(got.double(), atol=1e-3).max() <= 10


def _twin_optimizers(shapes: list[tuple[int, int]], dtype: torch.dtype) -> tuple[list, Muon, list, Muon]:
    torch.manual_seed(2)
    a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    settings = dict(lr=0.05, momentum=0.9, weight_decay=0.1, ns_dtype=dtype)
    return a, Muon(a, **settings), b, GramMuon(b, **settings)  # type: ignore[arg-type]


def _step_both(a: list, textbook: Muon, b: list, fast: Muon, steps: int = 3) -> None:
    for _ in range(steps):
        for p, q in zip(a, b, strict=True):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        textbook.step()
        fast.step()


def test_gram_muon_steps_are_muon_steps() -> None:
    shapes = [(96, 24), (24, 96), (96, 24), (72, 24)]  # tall, wide, a pair stacked, 3:1
    a, textbook, b, fast = _twin_optimizers(shapes, torch.float32)
    start = [p.detach().clone() for p in a]
    _step_both(a, textbook, b, fast)
    for p, q, p0 in zip(a, b, start, strict=True):
        step = (p - p0).abs().max()  # three steps of lr 0.05 (times the shape's scale, up to 2)
        assert 0.05 < step < 0.05 * 3 * 2 * 2
        assert (p - q).abs().max() < TOLERANCE * step


@pytest.mark.parametrize(("shapes", "dtype"), [([(24, 24), (30, 20)], torch.float32),
                                               ([(96, 24)], torch.bfloat16)])  # fmt: skip
def test_gram_muon_keeps_the_textbook_where_it_would_not_pay(
    shapes: list[tuple[int, int]], dtype: torch.dtype
) -> None:
    """Square and nearly square matrices, and products in bf16: the textbook's iteration, exactly."""
    a, textbook, b, fast = _twin_optimizers(shapes, dtype)
    _step_both(a, textbook, b, fast, steps=2)
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)


def test_use_optimizer_engine_swaps_muon_both_ways_and_keeps_the_state() -> None:
    model_cfg, cfg = tiny(optimizer="muon")
    model = GPT(model_cfg)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"), torch.float32)
    muon = optimizer.optimizers[0]  # type: ignore[attr-defined]
    assert type(muon) is Muon
    assert use_optimizer_engine(optimizer, "fast") is optimizer and type(muon) is GramMuon
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    state = optimizer.state_dict()
    use_optimizer_engine(optimizer, "reference")
    assert type(muon) is Muon
    assert str(optimizer.state_dict()) == str(state)
    adamw = make_optimizer(model, tiny()[1], torch.device("cpu"))
    assert type(use_optimizer_engine(adamw, "fast")) is torch.optim.AdamW  # nothing of Muon's to swap
    with pytest.raises(ValueError, match="engine"):
        use_optimizer_engine(optimizer, "turbo")


@pytest.mark.parametrize(("engine", "expected"), [("fast", GramMuon), ("reference", Muon)])
def test_a_training_run_uses_the_engines_muon(tmp_path: Path, engine: str, expected: type) -> None:
    with trainer(prepare(tmp_path), tmp_path / "run", optimizer="muon", engine=engine) as t:
        assert type(t.parts.optimizer.optimizers[0]) is expected  # type: ignore[attr-defined]
