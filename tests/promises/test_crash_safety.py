"""Crash safety with real processes: SIGKILL at chosen and at random moments, failed writes, a lock.

- One training run is SIGKILLed four times and resumed after each kill: while ``best/`` is half
  written in its temporary folder, between the two renames that publish ``last/``, the instant a
  checkpoint write is seen in progress, and at a random moment. After every kill ``best`` and
  ``last`` (or their ``.old`` twins) load; at the end the run equals an unbroken one with the same
  seed (fp32, within 1e-4) and no temporary is left. The first two moments are reached exactly by
  running the CLI with a hook that stops the process there (``PAUSER``); the test then kills it.
- A write that fails (a full disk, simulated in process, or ``/dev/full`` for real; a read-only
  folder) is one ``error:`` line with exit status 2, and the previous checkpoint is intact.
- A second process training into the same run directory exits 2 naming the first.

Run: ``pytest -q tests/promises/test_crash_safety.py`` (about 30 s, mostly subprocess start-up).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers_train import main, one_error_line, prepare, rows, subprocess_env, summary, tiny, train_args
from minigpt2 import data
from minigpt2.errors import DataError
from minigpt2.storage import checkpoint
from minigpt2.storage.fileio import recover_dir
from minigpt2.training import metrics
from minigpt2.training import trainer as train

STEPS = 40
Proc = subprocess.Popen[bytes]
FLAGS = ("--max-iters", STEPS, "--eval-interval", 2, "--dropout", 0.1, "--no-early-stopping")

# `minigpt2 train`, stopped for good at one moment of a checkpoint write. PAUSE_AT is
# "mid-write:NAME:N" (the N-th write of NAME/ has its weights in the temporary folder but no
# checkpoint.json yet) or "renames:NAME:N" (NAME/ was just renamed to NAME.old, the new folder not
# yet renamed into place). The real code runs unchanged; only the process stops there.
PAUSER = """
import os, sys, time
from pathlib import Path
from minigpt2 import cli
from minigpt2.storage import checkpoint
moment, name, nth = os.environ["PAUSE_AT"].split(":")
seen, write, replace = [0], checkpoint.atomic_write_bytes, os.replace
def pause_if_due():
    seen[0] += 1
    if seen[0] == int(nth):
        Path(os.environ["PAUSE_FILE"]).write_text("paused")
        time.sleep(600)
def atomic_write_bytes(path, data):
    if path.name == checkpoint.META and path.parent.name.startswith(f".{name}.tmp-"):
        pause_if_due()
    write(path, data)
def os_replace(src, dst):
    replace(src, dst)
    if Path(src).name == name and Path(dst).name == name + ".old":
        pause_if_due()
if moment == "mid-write":
    checkpoint.atomic_write_bytes = atomic_write_bytes
else:
    os.replace = os_replace
sys.exit(cli.main(sys.argv[1:]))
"""


def start(tmp: Path, args: list[str], pause: str | None = None) -> Proc:
    env = dict(subprocess_env(), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "minigpt2", *args]
    if pause:
        (tmp / "pauser.py").write_text(PAUSER, encoding="utf-8")
        (tmp / "paused").unlink(missing_ok=True)
        env.update(PAUSE_AT=pause, PAUSE_FILE=str(tmp / "paused"))
        cmd = [sys.executable, str(tmp / "pauser.py"), *args]
    with open(tmp / "train.log", "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=tmp)


def wait_for(proc: Proc, ready: Callable[[], bool], what: str, pause: float = 0.01) -> None:
    deadline = time.monotonic() + 60
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within 60 s"
        time.sleep(pause)


def kill(proc: Proc, run: Path) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists()  # it was cut short


def intact(run: Path) -> dict[str, int]:
    """Both checkpoints (or their .old twins) load with finite weights; returns their steps."""
    steps = {}
    for name in ("best", "last"):
        model, _, ckpt = checkpoint.load_model(recover_dir(run / name))
        assert all(torch.isfinite(p).all() for p in model.parameters())
        steps[name] = ckpt.meta["step"]
    assert checkpoint.load_train_state(recover_dir(run / "last"))["step"] == steps["last"]
    return steps


def test_sigkill_at_many_moments_then_resume_equals_an_unbroken_run(tmp_path: Path) -> None:
    d, run = prepare(tmp_path), tmp_path / "run"
    resume = train_args(d, run, "--resume")
    paused = tmp_path / "paused"

    # 1. The third best/ is half written: weights in .best.tmp-PID, no checkpoint.json yet.
    proc = start(tmp_path, train_args(d, run, *FLAGS), pause="mid-write:best:3")
    wait_for(proc, paused.exists, "the pause in the third write of best/")
    kill(proc, run)
    half = run / f".best.tmp-{proc.pid}"
    assert (half / checkpoint.WEIGHTS).is_file() and not (half / checkpoint.META).exists()
    first = intact(run)
    assert first["last"] >= 2 and 2 <= first["best"] <= first["last"]

    # 2. Resumed, then killed between the renames that publish last/: only last.old exists.
    proc = start(tmp_path, resume, pause="renames:last:2")
    wait_for(proc, paused.exists, "the pause between the renames of last/")
    kill(proc, run)
    assert not (run / "last").exists() and (run / "last.old").is_dir()
    assert not half.exists()  # the leftover of kill 1 was removed by the resumed run
    second = intact(run)
    assert second["last"] > first["last"]

    # 3. Resumed, killed the instant its third checkpoint write is seen in progress.
    proc = start(tmp_path, resume)
    tmps = [str(run / f".{n}.tmp-{proc.pid}") for n in ("best", "last")]
    writes, seen = 0, False
    while proc.poll() is None and writes < 3:  # busy polling: a write lasts a few milliseconds
        now = any(map(os.path.isdir, tmps))
        writes, seen = writes + (now and not seen), now
    kill(proc, run)
    intact(run)

    # 4. Resumed, killed at a random moment once its training loop has begun (metrics.csv rewritten).
    inode = (run / "metrics.csv").stat().st_ino
    proc = start(tmp_path, resume)
    wait_for(proc, lambda: (run / "metrics.csv").stat().st_ino != inode, "the training loop", 0.001)
    time.sleep(random.uniform(0.0, 0.3))
    if proc.poll() is None:  # else it finished first: a kill point fewer, nothing wrong
        kill(proc, run)
        intact(run)

    # 5. Resumed to the end: exactly the unbroken run.
    proc = start(tmp_path, resume)
    assert proc.wait(timeout=120) == 0, (tmp_path / "train.log").read_text(errors="replace")[-3000:]
    whole_dir = tmp_path / "whole"
    whole = train.train(d, whole_dir, *tiny(max_iters=STEPS, eval_interval=2, dropout=0.1,
                                            early_stopping=False))  # fmt: skip
    s = summary(run)
    assert s["steps"] == STEPS and s["best_step"] == whole.best_step
    assert s["best_val_loss"] == pytest.approx(whole.best_val_loss, abs=1e-4)
    got, want = rows(run), rows(whole_dir)
    assert [int(r["step"]) for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, want, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
    assert got[-1]["val_loss"] == pytest.approx(want[-1]["val_loss"], abs=1e-4)
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in whole_dir.iterdir())


def error_line(rc: int, err: str) -> str:
    """The CLI's contract for an error during training: status 2, no traceback, and after the
    progress messages exactly one line of its own starting with ``error:``, the last one."""
    assert rc == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and sum("error:" in line for line in lines) == 1, err
    return lines[-1]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def finished(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    """(data folder, run directory of 4 steps with best/ and last/)."""
    d, run = prepare(tmp_path), tmp_path / "run"
    assert main(capsys, *train_args(d, run, "--max-iters", 4, "--eval-interval", 2))[0] == 0
    return d, run


def _inject(monkeypatch: pytest.MonkeyPatch, fault: str) -> tuple[int, str]:
    """Make one kind of write fail; returns (errno, what the error line must say)."""
    code = errno.EROFS if fault.endswith("erofs") else errno.ENOSPC
    write, replace = checkpoint.atomic_write_bytes, os.replace

    def fail_weights(path: Path, payload: bytes) -> None:
        if path.name == checkpoint.WEIGHTS:
            raise OSError(code, os.strerror(code), str(path))
        write(path, payload)

    def full_open(path: Any, mode: str = "r", *args: Any, **kw: Any) -> Any:  # the kernel's own ENOSPC
        return builtins.open("/dev/full" if Path(path).name == checkpoint.TRAIN_STATE else path, mode,
                             *args, **kw)  # fmt: skip

    def fail_publish(src: Any, dst: Any) -> None:  # the rename into place, after the old moved aside
        if Path(dst).name in ("best", "last") and Path(src).name.startswith("."):
            raise OSError(code, os.strerror(code), str(dst))
        replace(src, dst)

    def fail_metrics(path: Path, text: str) -> None:  # a write that the CLI words itself
        raise OSError(code, os.strerror(code), str(path))

    if fault == "train-state-dev-full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    target, name, fake = {
        "weights": (checkpoint, "atomic_write_bytes", fail_weights),
        "train": (checkpoint, "open", full_open),
        "publish": (os, "replace", fail_publish),
        "metrics": (metrics, "atomic_write_text", fail_metrics),
    }[fault.split("-")[0]]
    monkeypatch.setattr(target, name, fake, raising=False)
    said = "error: No space left on device" if target is metrics else "cannot write the checkpoint"
    return code, said


@pytest.mark.parametrize(
    "fault", ["weights-enospc", "weights-erofs", "train-state-dev-full", "publish-enospc", "metrics-enospc"]
)
def test_a_failed_write_is_one_line_and_keeps_the_previous_checkpoint(
    finished: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    fault: str,
) -> None:  # fmt: skip
    d, run = finished
    best, last = _files(run / "best"), _files(run / "last")
    code, expected = _inject(monkeypatch, fault)
    line = error_line(*main(capsys, *train_args(d, run, "--resume", "--max-iters", 8))[::2])
    assert expected in line and os.strerror(code) in line, line
    assert _files(run / "last") == last  # the failed write changed nothing
    if fault != "train-state-dev-full":  # there best/ (no train state) was legitimately updated first
        assert _files(run / "best") == best
    assert sorted(p.name for p in run.iterdir() if p.name.endswith(".old") or ".tmp" in p.name) == []
    intact(run)
    monkeypatch.undo()  # space again: the run resumes where it was and finishes
    assert main(capsys, *train_args(d, run, "--resume", "--max-iters", 8))[0] == 0
    assert summary(run)["steps"] == 8


def test_a_full_disk_during_prepare_leaves_no_mixed_data_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    d = prepare(tmp_path)
    write = data.atomic_write_bytes

    def fail_val(path: Path, payload: bytes) -> None:
        if path.name == "val.bin":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write(path, payload)

    monkeypatch.setattr(data, "atomic_write_bytes", fail_val)
    fresh = tmp_path / "fresh"
    line = one_error_line(*main(capsys, "prepare", tmp_path / "data.txt", "--out", fresh)[::2])
    assert "cannot write the data folder" in line and not fresh.exists()
    one_error_line(*main(capsys, "prepare", tmp_path / "data.txt", "--out", d, "--block-size", 16)[::2])
    with pytest.raises(DataError, match="not a prepared data folder"):  # never new splits, old meta
        data.load(d)


def test_a_read_only_run_directory_is_one_line_and_changes_nothing(
    finished: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    d, run = finished
    before = _files(run)
    run.chmod(0o555)
    try:
        with contextlib.suppress(PermissionError):
            (run / "probe").touch()
            pytest.skip("this user (root?) writes into read-only folders, so none can be tested here")
        line = error_line(*main(capsys, *train_args(d, run, "--resume", "--max-iters", 8))[::2])
        assert os.strerror(errno.EACCES) in line
        assert _files(run) == before
    finally:
        run.chmod(0o755)


def test_a_second_process_training_into_the_same_run_is_refused(tmp_path: Path) -> None:
    d, run = prepare(tmp_path), tmp_path / "run"
    args = train_args(d, run, "--max-iters", 100_000, "--eval-interval", 50)
    first = start(tmp_path, args)
    try:
        wait_for(first, (run / "config.json").is_file, "the first run's start")  # written under the lock
        second = subprocess.run([sys.executable, "-m", "minigpt2", *args], capture_output=True, text=True,
                                env=subprocess_env(), cwd=tmp_path, timeout=120)  # fmt: skip
        line = one_error_line(second.returncode, second.stderr)
        assert f"another training process is using {run}" in line
        assert first.poll() is None  # undisturbed
        first.send_signal(signal.SIGTERM)  # stops cleanly at the next step, last/ saved
        assert first.wait(timeout=60) == 128 + signal.SIGTERM  # as shells expect of a terminated command
    finally:
        if first.poll() is None:
            first.kill()
    s = summary(run)
    assert s["stop_reason"].startswith("interrupted")
    assert checkpoint.load(run / "last").meta["step"] == s["steps"]
