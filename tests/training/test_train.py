"""Tests for the training loop (``training.trainer``, ``runstate``, ``metrics``, ``precision``) and the
textbook step (``core/train_step.py``), in process.

Covered: the files a run writes (best/, last/, metrics.csv with its exact columns and one row per
step, loss.png, config.json, summary.json) and that ``sample``/``load_model`` use them; the logged LR
following ``schedule.lr_at``; gradient clipping (flag, logged pre-clip norm, the update really capped);
early stopping on an overfitting corpus; gradient accumulation; bf16 autocast on CPU; ``--init-from``
vocabulary extension; loss on bot turns; divergence to NaN; RunLock; the textbook step and
evaluation on their own, without a trainer. Everything uses preset "tiny"
at context 16 on tiny corpora in ``tmp_path``, fp32 on CPU. Subprocess runs (resume after SIGKILL,
DDP, bad options) are in ``test_train_cli.py``. Run: ``pytest -q tests/training/test_train.py``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_train import BLOCK, corpus_text, main, meta, prepare, rows, summary, tiny, train_args, trainer
from minigpt2 import cli, data
from minigpt2.core.batches import bot_mask, random_starts
from minigpt2.core.model import GPT
from minigpt2.core.schedule import lr_at
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.core.train_step import evaluate, train_step
from minigpt2.errors import ConfigError, UserError
from minigpt2.hardware.machine import cpu_autocast_pays
from minigpt2.hardware.precision import choose_precision
from minigpt2.storage import checkpoint
from minigpt2.training import trainer as train
from minigpt2.training.metrics import COLUMNS
from minigpt2.training.runstate import RunLock

STEPS = 20


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CLI training run (in process) of STEPS steps, evaluated every 5, shared by several tests."""
    tmp = tmp_path_factory.mktemp("trained")
    d = prepare(tmp)
    assert cli.main(train_args(d, tmp / "run", "--max-iters", STEPS, "--eval-interval", 5)) == 0
    return tmp / "run"


def test_run_writes_its_files(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("best", "last"):
        assert (run / name / "checkpoint.json").is_file() and (run / name / "model.safetensors").is_file()
    assert (run / "last" / "train_state.pt").is_file()
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert header.split(",") == COLUMNS
    assert COLUMNS == ["step", "train_loss", "val_loss", "lr", "grad_norm", "clipped", "tokens_per_s",
                       "elapsed_s"]  # fmt: skip
    got = rows(run)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    evals = {int(r["step"]): r["val_loss"] for r in got if not math.isnan(r["val_loss"])}
    assert sorted(evals) == [5, 10, 15, 20]
    assert all(math.isfinite(r["train_loss"]) and r["tokens_per_s"] > 0 for r in got)
    s = summary(run)
    assert s["steps"] == STEPS and s["stop_reason"].startswith("reached max_iters")
    assert s["best_val_loss"] == pytest.approx(min(evals.values()), abs=1e-6)
    assert s["bits_per_char"] == pytest.approx(s["best_val_loss"] / math.log(2))
    best, last = meta(run / "best"), meta(run / "last")
    assert best["step"] == s["best_step"] and evals[best["step"]] == min(evals.values())
    assert best["val_loss"] == pytest.approx(evals[best["step"]], abs=1e-6)  # this step's, not NaN
    assert last["step"] == STEPS and last["val_loss"] == pytest.approx(evals[STEPS], abs=1e-6)
    cfg = (run / "config.json").read_text()
    assert '"max_iters": 20' in cfg and '"block_size": 16' in cfg
    model, tok, _ = checkpoint.load_model(run)
    assert isinstance(model, GPT) and tok == CharTokenizer.from_text([corpus_text()])
    rc, out, _ = main(capsys, "sample", run, "--prompt", "The ", "--max-new-tokens", 20, "--seed", 1,
                      "--device", "cpu", "--dtype", "fp32")  # fmt: skip
    assert rc == 0 and out.startswith("The ") and len(out.rstrip("\n")) > len("The ")


def test_logged_lr_follows_the_schedule(run: Path) -> None:
    _, cfg = tiny(max_iters=STEPS)
    for r in rows(run):
        expected = lr_at(int(r["step"]) - 1, lr=cfg.lr, min_lr=cfg.min_lr, warmup_iters=cfg.warmup_iters,
                         max_iters=STEPS, schedule=cfg.lr_schedule)  # fmt: skip
        assert r["lr"] == pytest.approx(expected, rel=1e-12)
    assert rows(run)[cfg.warmup_iters - 1]["lr"] == pytest.approx(cfg.lr)


def test_clipped_column_matches_logged_norm(run: Path) -> None:
    _, cfg = tiny()
    for r in rows(run):
        assert r["clipped"] == float(r["grad_norm"] > cfg.grad_clip)


@pytest.mark.parametrize("grad_clip", [0.01, 0.0])
def test_clipping_caps_the_update(tmp_path: Path, grad_clip: float) -> None:
    seen: list[float] = []
    with trainer(prepare(tmp_path), tmp_path / "run", grad_clip=grad_clip) as t:
        step = t.parts.optimizer.step

        def measured_step(*args: object, **kwargs: object) -> object:
            norms = [p.grad.norm() for p in t.parts.raw_model.parameters() if p.grad is not None]
            seen.append(float(torch.linalg.vector_norm(torch.stack(norms))))
            return step(*args, **kwargs)

        t.parts.optimizer.step = measured_step  # type: ignore[method-assign]
        results = [t.train_step() for _ in range(3)]
    assert len(seen) == 3
    for (_, norm, clipped, _), applied in zip(results, seen, strict=True):
        if grad_clip:
            assert clipped and norm > grad_clip and applied == pytest.approx(grad_clip, rel=1e-4)
        else:
            assert not clipped and applied == pytest.approx(norm, rel=1e-5)


def test_the_textbook_step_works_without_the_trainer() -> None:
    """``core.train_step`` on a bare GPT and AdamW: the weights move, the gradients are cleared;
    ``evaluate`` is the eval-mode loss, and leaves the model training."""
    model_cfg, cfg = tiny(dropout=0.1)
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(model_cfg, vocab_size=20))
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    fp32 = choose_precision(torch.device("cpu"), "fp32")
    x, y = torch.randint(0, 20, (2, 4, BLOCK)), torch.randint(0, 20, (2, 4, BLOCK))  # two passes
    before = [p.detach().clone() for p in params]
    passes = [(x[0], y[0], 0.5), (x[1], y[1], 0.5)]
    result = train_step(model, optimizer, scaler, passes, fp32, cfg.grad_clip, params)
    assert math.isfinite(float(result.loss)) and result.grad_norm > 0
    assert result.clipped == (result.grad_norm > cfg.grad_clip)
    assert all(p.grad is None for p in params) and not all(map(torch.equal, before, params))
    val = float(evaluate(model, [(x[0], y[0]), (x[1], y[1])], fp32))
    assert model.training  # dropout is back on for the next step
    model.eval()
    with torch.no_grad():
        assert val == pytest.approx((float(model(x[0], y[0])[1]) + float(model(x[1], y[1])[1])) / 2)


def test_early_stopping_keeps_the_best(tmp_path: Path) -> None:
    train_text, val_text = "the cat sat on the mat. " * 60, "a dog ran to a big red barn, oh no! " * 4
    n = len(train_text) + len(val_text)
    d = prepare(tmp_path, text=train_text + val_text, val_fraction=len(val_text) / n)
    model_cfg, cfg = tiny(max_iters=200, eval_interval=5, patience=2, lr=1e-2, warmup_iters=0)
    result = train.train(d, tmp_path / "run", model_cfg, cfg)
    assert result.stop_reason.startswith("early stopping") and result.steps < 200
    evals = [(int(r["step"]), r["val_loss"]) for r in rows(tmp_path / "run") if not math.isnan(r["val_loss"])]
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert [s for s, _ in evals if s > best_step] == [best_step + 5, best_step + 10]  # exactly patience
    assert result.best_step == best_step and result.best_val_loss == pytest.approx(best_loss, abs=1e-6)
    assert meta(tmp_path / "run" / "best")["val_loss"] == pytest.approx(best_loss, abs=1e-6)
    assert meta(tmp_path / "run" / "best")["step"] == best_step
    assert meta(tmp_path / "run" / "last")["step"] == result.steps > best_step


def test_grad_accum_sees_the_same_batch(tmp_path: Path) -> None:
    """Accumulating 2 x 4 draws the same 8 windows as one batch of 8 (the sampler is one generator
    drawn in order), and with equal-sized unmasked micro-batches the mean of means is the mean: the
    same loss and gradient up to float rounding. (Evaluation differs by design: its batches have
    batch_size windows, so only training is compared.)"""
    d = prepare(tmp_path)
    out = {}
    for bs, accum in ((4, 2), (8, 1)):
        with trainer(d, tmp_path / f"run{bs}", batch_size=bs, grad_accum=accum, dropout=0.0) as t:
            state = t.parts.batches.generator.get_state()
            xs = torch.cat([x for x, _, _ in t.parts.batches.passes()])
            t.parts.batches.generator.set_state(state)
            out[bs] = (xs, t.train_step(), t.train_step())
    assert torch.equal(out[4][0], out[8][0])
    for a, b in zip(out[4][1:], out[8][1:], strict=True):
        assert a[0] == pytest.approx(b[0], abs=1e-6) and a[1] == pytest.approx(b[1], rel=1e-5)


@pytest.mark.parametrize(
    ("pass_tokens", "loss_on"), [(3 * BLOCK, "all"), (4 * BLOCK, "all"), (BLOCK, "all"), (3 * BLOCK, "bot")]
)
def test_passes_of_a_batch_give_the_same_step(tmp_path: Path, pass_tokens: int, loss_on: str) -> None:
    """A batch of 8 run as passes of 3 + 3 + 2, 4 + 4 or 1 x 8 sequences (``max_pass_tokens``)
    gives the one-pass loss, gradient norm and weights, up to float rounding; with the bot-only loss
    too, where pieces count different numbers of targets."""
    if loss_on == "bot":
        d = tmp_path / "dialogue"
        data.prepare("chatterbot:italian", d, block_size=BLOCK)
    else:
        d = prepare(tmp_path)
    results = {}
    for tokens in (8 * BLOCK, pass_tokens):
        with trainer(d, tmp_path / f"run{tokens}", batch_size=8, dropout=0.0, max_pass_tokens=tokens,
                     loss_on=loss_on) as t:  # fmt: skip
            assert t.parts.pass_size == (8 if tokens == 8 * BLOCK else tokens // BLOCK)
            steps = [t.train_step()[:2] for _ in range(2)]
            results[tokens] = (
                steps,
                torch.cat([p.detach().flatten() for p in t.parts.raw_model.parameters()]),
            )
    (one_pass, w1), (pieces, w2) = results[8 * BLOCK], results[pass_tokens]
    for a, b in zip(one_pass, pieces, strict=True):
        assert a[0] == pytest.approx(b[0], abs=1e-6) and a[1] == pytest.approx(b[1], rel=1e-5)
    assert torch.allclose(w1, w2, atol=1e-6)


def test_max_pass_tokens_auto_cuts_big_cpu_batches_only(tmp_path: Path) -> None:
    d = prepare(tmp_path)
    with trainer(d, tmp_path / "small", batch_size=8) as t:  # 8 x 16 tokens: well under 4096
        assert t.parts.pass_size == 8
    with trainer(d, tmp_path / "big", batch_size=300) as t:  # 4,800 tokens: 256 per pass
        assert t.parts.pass_size == 4096 // BLOCK


def test_bf16_autocast_is_active_on_cpu() -> None:
    cpu = torch.device("cpu")
    p = choose_precision(cpu, "bf16")
    a = torch.randn(4, 8)
    with p.autocast():
        assert (a @ a.T).dtype == torch.bfloat16
    assert (a @ a.T).dtype == torch.float32 and not p.use_scaler
    with choose_precision(cpu, "fp32").autocast():
        assert (a @ a.T).dtype == torch.float32
    with pytest.raises(ConfigError):
        choose_precision(cpu, "fp16")
    assert (choose_precision(cpu, "auto").name == "bf16") == cpu_autocast_pays(4096, 256)
    # auto and a tiny run (too little work per pass): fp32; a real one: bf16 where it measured faster
    assert choose_precision(cpu, "auto", work=8 * 32 * 32**2).name == "fp32"
    real = choose_precision(cpu, "auto", work=4096 * 192**2, shape=(4096, 192))
    assert (real.name == "bf16") == cpu_autocast_pays(4096, 192) and "measured" in real.reason
    assert choose_precision(cpu, "bf16", work=1).name == "bf16"  # asked for: given
    fp16 = choose_precision(torch.device("cuda"), "fp16")  # no GPU needed to resolve it
    assert fp16.use_scaler and fp16.dtype == torch.float16


def test_init_from_extends_the_vocabulary(
    tmp_path: Path, run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = checkpoint.load(run)
    text = corpus_text(seed=3) + "Room 101 at 7:45 costs $20 & 5% tax.\n" * 8
    new_chars = set(text) - set(base.tokenizer.chars)
    assert len(new_chars) >= 8
    d = prepare(tmp_path, text=text)
    with trainer(d, tmp_path / "direct", init_from=run) as t:
        old_v = base.model_config.vocab_size
        assert t.parts.tokenizer.chars[: old_v - 4] == base.tokenizer.chars
        assert t.parts.model_cfg.vocab_size == old_v + len(new_chars)
        old_wte = base.build_model().transformer.wte.weight
        assert torch.equal(t.parts.raw_model.transformer.wte.weight[:old_v].detach(), old_wte)
        assert t.parts.tokenizer.decode(t.parts.train_data[:200].tolist()) == text[:200]  # ids re-encoded
    rc, _, err = main(capsys, *train_args(d, tmp_path / "ft", "--init-from", run, "--max-iters", 2,
                                          "--eval-interval", 2))  # fmt: skip
    assert rc == 0, err
    ft = checkpoint.load(tmp_path / "ft")
    assert ft.model_config.vocab_size == base.model_config.vocab_size + len(new_chars)
    assert ft.tokenizer.chars[: len(base.tokenizer.chars)] == base.tokenizer.chars
    assert set(ft.tokenizer.chars[len(base.tokenizer.chars) :]) == new_chars


def test_loss_on_bot_masks_targets_and_trains(tmp_path: Path) -> None:
    d = tmp_path / "it"
    data.prepare("chatterbot:italian", d, block_size=16)
    with trainer(d, tmp_path / "run", loss_on="bot", max_iters=3, eval_interval=3) as t:
        gen = torch.Generator()
        gen.set_state(t.parts.batches.generator.get_state())
        starts = random_starts(len(t.parts.train_data), t.parts.global_batch, 16, gen)
        _, y, _ = next(t.parts.batches.passes())
        bot = bot_mask(t.parts.train_data)[starts[:, None] + np.arange(1, 17)]
        assert 0 < bot.sum() < bot.size
        assert torch.equal(y != -1, torch.from_numpy(bot))
        result = t.run()
    assert result.steps == 3 and math.isfinite(result.best_val_loss)
    assert all(math.isfinite(r["train_loss"]) for r in rows(tmp_path / "run"))


def test_nan_loss_stops_as_diverged_with_best_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    forward, calls = GPT.forward, [0]

    def nan_after_4_steps(self: GPT, *args: object, **kwargs: object) -> object:
        logits, loss = forward(self, *args, **kwargs)  # type: ignore[arg-type]
        if self.training and loss is not None:
            calls[0] += 1
            if calls[0] > 4:
                loss = loss * math.nan
        return logits, loss

    monkeypatch.setattr(GPT, "forward", nan_after_4_steps)
    run_dir = tmp_path / "run"
    rc, out, _ = main(capsys, *train_args(prepare(tmp_path), run_dir, "--eval-interval", 2))
    assert rc == 1 and "stopped: diverged" in out
    s = summary(run_dir)
    assert s["stop_reason"].startswith("diverged") and s["steps"] == 4 and s["best_step"] in (2, 4)
    assert [int(r["step"]) for r in rows(run_dir)] == [1, 2, 3, 4]
    model, _, ckpt = checkpoint.load_model(run_dir / "best")
    assert ckpt.meta["step"] == s["best_step"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_run_lock_is_exclusive_and_released_after_a_failed_start(tmp_path: Path) -> None:
    lock = RunLock(tmp_path / "run")
    with pytest.raises(UserError, match="another training process"):
        RunLock(tmp_path / "run")
    lock.release()
    RunLock(tmp_path / "run").release()
    model_cfg, cfg = tiny(batch_size=100_000)
    with pytest.raises(ConfigError, match="batch"):
        train.train(prepare(tmp_path), tmp_path / "run", model_cfg, cfg)
    RunLock(tmp_path / "run").release()  # the failed start released its lock


class _Bar:
    """tqdm's part the progress bar uses, recording the totals it is given."""

    def __init__(self, total: int, initial: int, **_: object) -> None:
        self.total, self.n, self.totals = total, initial, [total]
        self.closed = False

    def __setattr__(self, name: str, value: object) -> None:
        if name == "total" and hasattr(self, "totals"):
            self.totals.append(value)  # type: ignore[arg-type]
        super().__setattr__(name, value)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None: ...

    def update(self, n: int) -> None:
        self.n += n

    def close(self) -> None:
        self.closed = True


def test_with_a_time_budget_the_bar_counts_the_steps_the_budget_allows(tmp_path: Path) -> None:
    from minigpt2.training.metrics import ProgressBar

    d = prepare(tmp_path)
    bars: list[_Bar] = []

    def make(**kw: object) -> _Bar:
        bars.append(_Bar(**kw))  # type: ignore[arg-type]
        return bars[-1]

    bar = ProgressBar(make, lambda message: None)
    model_cfg, train_cfg = tiny(max_iters=10**7, max_minutes=0.02, eval_interval=10**6, samples=False)
    result = train.train(d, tmp_path / "run", model_cfg, train_cfg, callbacks=[bar])
    bar.on_end({})
    assert result.stop_reason.startswith("time budget")
    shown = bars[0]
    assert shown.totals[0] == 10**7  # before the first step: the most there can be
    assert all(t < 10**7 for t in shown.totals[1:]) and len(shown.totals) > 1
    assert shown.total == shown.n == result.steps and shown.closed  # it ends full, not at 0%
