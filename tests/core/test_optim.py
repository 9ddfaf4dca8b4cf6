"""Tests for the optimizers (``core/optim.py``, ``core/muon.py``): Muon's orthogonalization and
step, which parameters go to Muon and which to AdamW, the LR schedule reaching both, and an
interrupted Muon run resumed exactly.

Covered: ``orthogonalize`` keeps a matrix's singular vectors and pushes its singular values into
[0.5, 1.5] (tall, wide and square, stacked); a Muon step equals the same arithmetic written out per
matrix (momentum, Nesterov, the shape scale, weight decay), so the batching by shape mixes nothing;
Muon refuses non-matrices; ``make_optimizer`` gives Muon exactly the blocks' weight matrices; a
Muon run learns, follows the schedule, and resumes after an interrupt to the same weights as an
unbroken run, with the resumed config's LR scales (old states without them too); resuming
with the other optimizer is refused with one clear error; GradScaler (fp16)
steps and skips the Muon + AdamW pair as one optimizer. Tiny configs on CPU.
Run: ``pytest -q tests/core/test_optim.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from helpers_train import prepare, rows, tiny, trainer
from minigpt2.core import config
from minigpt2.core.model import GPT
from minigpt2.core.muon import Muon, Optimizers, orthogonalize
from minigpt2.core.optim import make_optimizer
from minigpt2.errors import ConfigError
from minigpt2.hardware.machine import muon_dtype
from minigpt2.storage import checkpoint
from minigpt2.training import trainer as train
from minigpt2.training.metrics import Callback, StepRecord


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 48, 16), (2, 16, 48), (1, 32, 32)])
def test_orthogonalize_keeps_directions_and_evens_out_sizes(
    shape: tuple[int, int, int], dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    # Singular values spread over two orders of magnitude, as in a gradient: the largest ones
    # dominate it. (Five iterations lift values down to ~1/500 of the norm: enough for these.)
    u, _, vh = torch.linalg.svd(torch.randn(shape), full_matrices=False)
    s = torch.logspace(0, -2, u.size(-1)).expand(shape[0], -1)
    g = u @ torch.diag_embed(s) @ vh
    out = orthogonalize(g, dtype=dtype)
    assert out.shape == g.shape and out.dtype == dtype
    sv = torch.linalg.svdvals(out.float())
    assert sv.min() > 0.5 and sv.max() < 1.5, sv
    # The same singular vectors: out ~ U V^T (to the spread of its singular values).
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(1), (u @ vh).flatten(1), dim=1)
    assert (cos > 0.9).all(), cos


def test_muon_step_is_the_written_out_arithmetic() -> None:
    """Two steps of Muon on matrices of three shapes (two of one shape, orthogonalized together)
    against the update computed matrix by matrix."""
    torch.manual_seed(1)
    shapes = [(24, 8), (8, 24), (24, 8), (16, 16)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    expected = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    lr, momentum, decay = 0.05, 0.9, 0.1
    # What Muon computes in on this CPU: bf16 where it is fast.
    ns_dtype = muon_dtype(torch.device("cpu"), tiny(optimizer="muon")[1])
    opt = Muon(params, lr=lr, momentum=momentum, weight_decay=decay, ns_dtype=ns_dtype)
    # In bf16 the products of a batch of matrices may be blocked (summed in another order) unlike
    # one matrix alone: a few bf16 roundings of an update of size lr, not a property of one CPU.
    atol = 1e-5 if ns_dtype == torch.float32 else 2 * lr * 2**-5
    for _ in range(2):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            bufs[i] = momentum * bufs[i] + (1 - momentum) * g
            nesterov = g + momentum * (bufs[i] - g)
            o = orthogonalize(nesterov.unsqueeze(0), dtype=ns_dtype)[0].float()
            scale = math.sqrt(max(1.0, shapes[i][0] / shapes[i][1]))
            expected[i] = expected[i] * (1 - lr * decay) - lr * scale * o
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=atol)


def test_muon_takes_matrices_only() -> None:
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


def test_make_optimizer_gives_muon_the_blocks_matrices() -> None:
    model_cfg, cfg = tiny(optimizer="muon")
    model = GPT(dataclasses.replace(model_cfg, vocab_size=40))
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(opt, Optimizers)
    muon, adamw = opt.optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    to_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    to_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    layers = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert to_muon == {f"transformer.h.{i}.{layer}.weight" for i in range(2) for layer in layers}
    assert to_muon.isdisjoint(to_adamw) and to_muon | to_adamw == set(names.values())
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"} <= to_adamw
    assert [g["lr_scale"] for g in opt.param_groups] == [cfg.muon_lr / cfg.lr, 1.0, 1.0]
    # The default stays GPT-2's AdamW, with every parameter.
    plain = make_optimizer(model, tiny()[1], torch.device("cpu"))
    assert isinstance(plain, torch.optim.AdamW)
    assert sum(len(g["params"]) for g in plain.param_groups) == len(names)


def test_optimizer_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="optimizer must be adamw or muon"):
        config.resolve("tiny", overrides={"optimizer": "sgd"})
    with pytest.raises(ConfigError, match="muon_lr must be > 0"):
        config.resolve("tiny", overrides={"muon_lr": 0.0})
    # The saved state of one kind of optimizer does not load into another.
    model = GPT(dataclasses.replace(tiny()[0], vocab_size=40))
    pair = make_optimizer(model, tiny(optimizer="muon")[1], torch.device("cpu"))
    with pytest.raises(ValueError, match="another optimizer"):
        pair.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def test_muon_run_learns_and_follows_the_schedule(tmp_path: Path) -> None:
    d = prepare(tmp_path)
    with trainer(d, tmp_path / "run", optimizer="muon", max_iters=30, warmup_iters=5) as t:
        first = t.evaluate()
        lrs = []
        for _ in range(30):
            t.train_step()
            lrs.append([g["lr"] for g in t.parts.optimizer.param_groups])
            t.parts.loop.step += 1
        assert t.evaluate() < first - 0.5
    scale = t.parts.cfg.muon_lr / t.parts.cfg.lr
    for muon_lr, adamw_lr, _ in lrs:
        assert muon_lr == pytest.approx(adamw_lr * scale, rel=1e-12)
    assert max(lr[0] for lr in lrs) == pytest.approx(t.parts.cfg.muon_lr)


class _InterruptAt(Callback):
    """Sends this process SIGINT after step ``at``: the trainer's handler saves ``last`` and stops."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step(self, record: StepRecord) -> None:
        if record.step == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def test_interrupted_muon_run_resumes_to_the_unbroken_run(tmp_path: Path) -> None:
    d = prepare(tmp_path)
    cfgs = tiny(optimizer="muon", max_iters=12, eval_interval=4, early_stopping=False)
    whole = train.train(d, tmp_path / "whole", *cfgs)
    stopped = train.train(d, tmp_path / "run", *cfgs, callbacks=[_InterruptAt(6)])
    # The request is read once the step's callbacks are done: the run stops after that step.
    assert stopped.steps == 6 and "interrupted" in stopped.stop_reason
    resumed = train.train(d, tmp_path / "run", *cfgs, resume=True)
    assert resumed.steps == whole.steps == 12
    for a, b in zip(rows(tmp_path / "run"), rows(tmp_path / "whole"), strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6) and a["lr"] == b["lr"]
    got = checkpoint.load_model(tmp_path / "run" / "last")[0].state_dict()
    want = checkpoint.load_model(tmp_path / "whole" / "last")[0].state_dict()
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=1e-6)


def test_resume_takes_this_configs_muon_lr_and_old_adamw_states(tmp_path: Path) -> None:
    """Loading the saved state puts back the saved param groups; the LR scale must come from the
    config resumed with (a new --muon-lr), and a state saved before there were LR scales (AdamW
    groups without ``lr_scale``) resumes at the schedule's LR."""
    d = prepare(tmp_path)
    train.train(d, tmp_path / "run", *tiny(optimizer="muon", max_iters=4, eval_interval=2))
    with trainer(d, tmp_path / "run", optimizer="muon", muon_lr=0.005, max_iters=8, resume=True) as t:
        assert t.parts.step == 4
        t.train_step()
        muon_lr, adamw_lr, _ = (g["lr"] for g in t.parts.optimizer.param_groups)
        assert muon_lr == pytest.approx(adamw_lr * 0.005 / t.parts.cfg.lr, rel=1e-12)
    train.train(d, tmp_path / "old", *tiny(max_iters=4, eval_interval=2))
    state = checkpoint.load_train_state(tmp_path / "old" / "last")
    for group in state["optimizer"]["param_groups"]:
        del group["lr_scale"]
    torch.save(state, tmp_path / "old" / "last" / checkpoint.TRAIN_STATE)
    with trainer(d, tmp_path / "old", max_iters=8, resume=True) as t:
        _, _, _, lr = t.train_step()
        assert [g["lr"] for g in t.parts.optimizer.param_groups] == [lr, lr]


@pytest.mark.parametrize(("first", "then"), [("adamw", "muon"), ("muon", "adamw")])
def test_resume_with_another_optimizer_is_refused(tmp_path: Path, first: str, then: str) -> None:
    d = prepare(tmp_path)
    train.train(d, tmp_path / "run", *tiny(optimizer=first, max_iters=4, eval_interval=2))
    with pytest.raises(ConfigError, match=f"trained with {first}; resume with --optimizer {first}"):
        train.train(d, tmp_path / "run", *tiny(optimizer=then, max_iters=8, eval_interval=2), resume=True)


def test_grad_scaler_drives_muon_and_adamw_together() -> None:
    """fp16 training's GradScaler (on a GPU) takes the pair like one optimizer: it unscales both
    optimizers' gradients, steps both, and skips both when a gradient overflowed."""
    model = GPT(dataclasses.replace(tiny()[0], vocab_size=40))
    opt = make_optimizer(model, tiny(optimizer="muon")[1], torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    idx = torch.randint(0, 40, (2, 16))
    for overflow in (False, True):
        before = [p.detach().clone() for p in model.parameters()]
        _, loss = model(idx, idx)
        assert loss is not None
        scaler.scale(loss).backward()
        if overflow:
            next(model.parameters()).grad.view(-1)[0] = math.inf  # type: ignore[union-attr]
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
        assert not any(moved) if overflow else all(moved)


def test_the_default_chatbot_resumes_with_the_settings_it_started_with(tmp_path: Path) -> None:
    """`make chat` after an upgrade: a chatbot run killed mid-training (no summary.json) under
    older settings (here AdamW, while the `chat` preset now uses Muon) goes on with its own."""
    from minigpt2.training import recipes

    d = prepare(tmp_path)
    run = tmp_path / "run"
    train.train(d, run, *tiny(max_iters=8, eval_interval=2), callbacks=[_InterruptAt(4)])
    (run / "summary.json").unlink()  # as if killed, not stopped
    assert recipes.ensure_chatbot("unused", d, run, preset="chat") == run
    s = json.loads((run / "summary.json").read_text())
    assert s["steps"] == 8 and json.loads((run / "config.json").read_text())["train"]["optimizer"] == "adamw"
