"""Shared by the model tests: the logits at every position, which inference does not compute, and
the check that a drop-in module computes what its textbook module computes."""

from __future__ import annotations

import torch

from minigpt2.core.model import KVCache


def all_logits(model: torch.nn.Module, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
    """(B, T, V): at inference the model computes only the last position's logits, so ask as
    training does (with targets; the loss is ignored)."""
    logits, _ = model(idx, torch.zeros_like(idx), cache=cache)
    return logits


def assert_same_function(tuned: torch.nn.Module, plain: torch.nn.Module, x: torch.Tensor) -> None:
    """In fp32, ``tuned`` (a drop-in) and ``plain`` (its textbook module, the same parameters in the
    same order) give ``x`` the same output and the same gradients of ``x`` and of every parameter,
    to rounding."""
    x, twin = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    got, expected = tuned(x), plain(twin)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(expected)
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(x.grad, twin.grad, atol=1e-5, rtol=1e-5)
    for (name, p_tuned), p_plain in zip(tuned.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p_tuned.grad, p_plain.grad, atol=1e-5, rtol=1e-4, msg=name)
