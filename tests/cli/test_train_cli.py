"""Tests for ``minigpt2 train`` / ``minigpt2 eval`` as commands: resume, refusals, bad options, DDP.

Covered: resume after SIGKILL (a real subprocess killed once ``last/`` exists) ends exactly like an
unbroken run; ``--resume`` with nothing to resume and a second training into a finished run exit 2
with one line; bad options (negative --lr, --patience 0, a batch larger than the data, a context
larger than the --init-from model's, an unknown preset, an unknown config-file key) exit 2 with one
line and no traceback; a huge LR diverges with exit 1; ``eval`` prints val loss and bits/char;
``torchrun`` with 2 processes x batch 4 matches 1 process x batch 8. CPU only, tiny runs in
``tmp_path``. Run: ``pytest -q tests/cli/test_train_cli.py`` (about 20 s, mostly subprocess start-up).
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers_train import main, meta, one_error_line, prepare, rows, subprocess_env, summary, tiny, train_args
from minigpt2 import data
from minigpt2.hardware.precision import choose_precision
from minigpt2.inference.evaluation import evaluate_tokens
from minigpt2.storage import checkpoint
from minigpt2.storage.fileio import recover_dir
from minigpt2.training import trainer as train


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data folder, finished run): 4 steps of preset "tiny", trained in process."""
    tmp = tmp_path_factory.mktemp("base")
    d = prepare(tmp)
    train.train(d, tmp / "run", *tiny(max_iters=4, eval_interval=2))
    return d, tmp / "run"


def test_resume_after_sigkill_equals_the_unbroken_run(tmp_path: Path) -> None:
    d, run = prepare(tmp_path), tmp_path / "run"
    flags = ("--max-iters", 40, "--eval-interval", 5, "--dropout", 0.1, "--no-early-stopping")
    cmd = [sys.executable, "-m", "minigpt2", *train_args(d, run, *flags)]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=subprocess_env(), cwd=tmp_path)
        deadline = time.monotonic() + 60
        while not (run / "last" / "checkpoint.json").is_file() and proc.poll() is None:
            assert time.monotonic() < deadline, "no last/ checkpoint within 60 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    assert not (run / "summary.json").exists()
    killed_at = meta(recover_dir(run / "last"))["step"]  # last.old if killed mid-publish
    assert 5 <= killed_at < 40

    resumed = subprocess.run(
        [sys.executable, "-m", "minigpt2", "train", "--data", str(d), "--out", str(run), "--resume"],
        capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    whole = train.train(d, tmp_path / "whole", *tiny(max_iters=40, eval_interval=5, dropout=0.1,
                                                     early_stopping=False))  # fmt: skip
    s = summary(run)
    assert s["steps"] == 40 and s["best_step"] == whole.best_step
    assert s["best_val_loss"] == pytest.approx(whole.best_val_loss, abs=1e-4)
    got, want = rows(run), rows(tmp_path / "whole")
    assert [int(r["step"]) for r in got] == list(range(1, 41))
    for a, b in zip(got, want, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
        assert a["lr"] == b["lr"] and math.isnan(a["val_loss"]) == math.isnan(b["val_loss"])
    assert got[-1]["val_loss"] == pytest.approx(want[-1]["val_loss"], abs=1e-4)


def test_nothing_to_resume_and_finished_run_are_refused(
    tmp_path: Path, base: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    d, run = base
    line = one_error_line(*main(capsys, *train_args(d, tmp_path / "empty", "--resume"))[::2])
    assert "resume" in line
    started = tmp_path / "started"  # a run that died before its first checkpoint
    started.mkdir()
    shutil.copy(run / "config.json", started / "config.json")
    assert "nothing to resume" in one_error_line(*main(capsys, *train_args(d, started, "--resume"))[::2])
    line = one_error_line(*main(capsys, *train_args(d, run, "--resume"), "--preset", "chat")[::2])
    assert "drop --preset chat" in line  # the run's own settings, not a preset's, silently or not
    before = (run / "config.json").read_text()
    line = one_error_line(*main(capsys, *train_args(d, run, "--max-iters", 2))[::2])
    assert "already holds a trained model" in line and "--resume" in line
    assert (run / "config.json").read_text() == before and summary(run)["steps"] == 4


def test_a_run_that_lost_its_last_checkpoint_goes_on_from_best(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d, run = prepare(tmp_path), tmp_path / "run"
    assert main(capsys, *train_args(d, run, "--max-iters", 6, "--eval-interval", 2))[0] == 0
    best_step, best_loss = meta(run / "best")["step"], meta(run / "best")["best_val_loss"]
    before = [r for r in rows(run) if r["step"] <= best_step]
    shutil.rmtree(run / "last")  # as a full disk during its first save leaves a run, or a user
    rc, out, err = main(capsys, *train_args(d, run, "--resume", "--max-iters", 10, "--eval-interval", 2))
    assert rc == 0, err
    said = out + err
    assert f"going on from best/ (step {best_step}" in said and "lost" in said
    assert summary(run)["steps"] == 10 and (run / "last" / checkpoint.META).is_file()
    after = rows(run)
    assert [r["step"] for r in after] == list(range(1, 11))  # the metrics up to best kept, then new
    assert [r["train_loss"] for r in after[: len(before)]] == [r["train_loss"] for r in before]
    assert summary(run)["best_val_loss"] <= best_loss


@pytest.mark.parametrize(("stop", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_training_exits_as_shells_expect(tmp_path: Path, stop: int, status: int) -> None:
    """130 for Ctrl-C and 143 for SIGTERM, so that `train && export` stops; after last/ is saved."""
    d, run = prepare(tmp_path), tmp_path / "run"
    cmd = [sys.executable, "-m", "minigpt2", *train_args(d, run, "--max-iters", 100000, "--eval-interval", 2)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(), cwd=tmp_path)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run / "last" / "checkpoint.json").is_file():  # the loop, and its signal handler, run
        assert time.monotonic() < deadline and proc.poll() is None, "no last/ checkpoint within 120 s"
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.05)
    proc.send_signal(stop)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-3000:]
    assert "stopped: interrupted; resume with --resume" in out and "Traceback" not in err
    assert summary(run)["stop_reason"].startswith("interrupted") and "stop_signal" not in summary(run)
    assert meta(run / "last")["step"] == summary(run)["steps"]  # the checkpoint is the last step


def test_sample_and_chat_before_the_first_evaluation_say_there_is_no_checkpoint_yet(
    tmp_path: Path, base: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    started = tmp_path / "started"  # what a training writes before its first evaluation
    started.mkdir()
    shutil.copy(base[1] / "config.json", started / "config.json")
    (started / ".lock").touch()
    for command in ("sample", "chat"):
        line = one_error_line(*main(capsys, command, started, "--prompt", "x", "--device", "cpu")[::2])
        assert line == (f"error: {started} has no checkpoint yet: training writes best/ at its first"
                        " evaluation (every eval_interval steps); wait for it, or train it again if its"
                        " training was killed before")  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--lr=-1"], "lr must be > 0"),
        (["--patience", "0"], "patience must be >= 1"),
        (["--batch-size", "100000"], "batch of 100000 windows"),
        (["--block-size", "32", "--init-from", "BASE"], "larger than the model's context"),
        (["--preset", "huge"], "unknown preset"),
        (["--config", "CONFIG"], "unknown setting(s): bogus_key"),
    ],
)
def test_bad_options_exit_2_with_one_line(
    tmp_path: Path,
    base: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    expected: str,
) -> None:
    (tmp_path / "bad.toml").write_text("lr = 1e-3\nbogus_key = 1\n")
    flags = [
        str(base[1]) if f == "BASE" else str(tmp_path / "bad.toml") if f == "CONFIG" else f for f in flags
    ]
    line = one_error_line(*main(capsys, *train_args(base[0], tmp_path / "run", *flags))[::2])
    assert expected in line
    assert not (tmp_path / "run" / "best").exists()


# A huge LR without clipping or warm-up: fp32 overflows within a few steps (fixed seed, CPU).
DIVERGE = ("--lr", "1e4", "--min-lr", "0", "--grad-clip", "0", "--warmup-iters", "0")


def test_huge_lr_diverges_with_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """lr 1e4 without clipping overflows fp32 within a few steps (deterministic: fixed seed, CPU)."""
    run = tmp_path / "run"
    rc, out, _ = main(
        capsys, *train_args(prepare(tmp_path), run, "--max-iters", 30, *DIVERGE, "--eval-interval", 1)
    )
    s = summary(run)
    assert rc == 1 and "stopped: diverged" in out and s["stop_reason"].startswith("diverged")
    assert s["steps"] < 30 and len(rows(run)) == s["steps"]
    if s["best_step"] > 0:  # best/ from before the divergence is intact and finite
        model, _, _ = checkpoint.load_model(run / "best")
        assert all(torch.isfinite(p).all() for p in model.parameters())
    # The closing lines name only what exists: no "best val loss none at step -1", no best/ that is not.
    saved = out.strip().splitlines()[-1]
    assert "step -1" not in out and "none" not in out
    assert ("best/" in saved) == (run / "best").exists() and ("last/" in saved) == (run / "last").exists()


def test_a_run_stopped_before_its_first_evaluation_says_it_has_no_best(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = (*DIVERGE, "--eval-interval", 50)
    rc, out, _ = main(capsys, *train_args(prepare(tmp_path), tmp_path / "run", "--max-iters", 30, *flags))
    assert rc == 1 and "no evaluation yet, so no best checkpoint" in out
    assert not (tmp_path / "run" / "best").exists() and "best/" not in out.strip().splitlines()[-1]


def test_eval_prints_val_loss_and_bits_per_char(
    base: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    d, run = base
    rc, out, err = main(capsys, "eval", run, "--data", d, "--device", "cpu", "--dtype", "fp32")
    assert rc == 0, err
    found = re.search(r"val loss ([\d.]+)\s+bits/char ([\d.]+)", out)
    assert found, out
    loss, bits = float(found[1]), float(found[2])
    assert bits == pytest.approx(loss / math.log(2), abs=2e-4)
    model, tok, _ = checkpoint.load_model(run)
    _, val = data.remap(data.load(d), tok)
    expected = evaluate_tokens(model, val, 32, choose_precision(torch.device("cpu"), "fp32"))
    assert loss == pytest.approx(expected, abs=1e-4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ddp_two_processes_match_one_process_with_the_global_batch(tmp_path: Path) -> None:
    """All ranks draw the same global batch and each takes its slice, so 2 x 4 is 1 x 8."""
    d = prepare(tmp_path)
    flags = ("--max-iters", 6, "--eval-interval", 3, "--batch-size", 4, "--dropout", 0)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "minigpt2"]  # fmt: skip
    ddp = subprocess.run(
        [*launcher, *train_args(d, tmp_path / "ddp", *flags)],
        capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=180,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-12000:]
    assert "DDP: 2 processes, global batch 8" in ddp.stderr
    train.train(d, tmp_path / "one", *tiny(max_iters=6, eval_interval=3, batch_size=8))
    got, want = rows(tmp_path / "ddp"), rows(tmp_path / "one")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(got, want, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
    assert got[-1]["val_loss"] == pytest.approx(want[-1]["val_loss"], abs=1e-5)
    assert got[2]["val_loss"] == pytest.approx(want[2]["val_loss"], abs=1e-5)


def test_resuming_a_run_that_was_not_trained_here_points_to_init_from(
    tmp_path: Path, base: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    d, run = base
    imported = tmp_path / "imported"  # what import-hf writes: best/ alone, no config.json
    shutil.copytree(run / "best", imported / "best")
    line = one_error_line(*main(capsys, *train_args(d, imported, "--resume"))[::2])
    assert "was not trained here" in line and f"--init-from {imported}" in line


def test_a_config_file_that_is_not_utf8_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"lr = 1e-3\n\xff\xfe bad\n")
    rc, _, err = main(capsys, *train_args(prepare(tmp_path), tmp_path / "run", "--config", bad))
    assert "is not UTF-8 text: byte 0xff at offset 10" in one_error_line(rc, err)
    assert not (tmp_path / "run").exists()


def test_after_the_command_a_second_ctrl_c_cannot_reach_the_interpreters_shutdown(tmp_path: Path) -> None:
    """``minigpt2`` (``cli.run``) ignores Ctrl-C once its command has returned: a second Ctrl-C just
    after the one that stopped a training would land in the shutdown's thread joins and print a
    traceback after the run was saved."""
    script = (
        "import signal, sys\n"
        "from minigpt2.cli import run\n"
        "code = run(['presets'])\n"
        "sys.stderr.write(str(signal.getsignal(signal.SIGINT) is signal.SIG_IGN))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=subprocess_env(), cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0 and done.stderr.endswith("True"), done.stderr
