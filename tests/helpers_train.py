"""Helpers shared by ``test_train.py`` and ``test_train_cli.py`` (not a test module).

Tiny corpora written under ``tmp_path``, tiny configs (preset "tiny", context 16, fp32, CPU), an
in-process ``minigpt2`` CLI call and a subprocess one. Everything is CPU only and hermetic.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from minigpt2 import cli, data
from minigpt2.core import config
from minigpt2.training.metrics import read_metrics
from minigpt2.training.trainer import Trainer

SRC = Path(__file__).resolve().parents[1] / "src"
BLOCK = 16
WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "an", "old",
    "river", "runs", "under", "bright", "moon", "near", "stone", "bridge;", "sailors", "sing,",
    "children", "laugh,", "winter", "comes", "early,", "bread", "is", "warm!",
]  # fmt: skip


def corpus_text(n_lines: int = 120, seed: int = 0) -> str:
    """A few KB of varied, seeded text: random sentences from a small word list."""
    r = random.Random(seed)
    lines = [" ".join(r.choice(WORDS) for _ in range(r.randint(4, 12))).capitalize() for _ in range(n_lines)]
    return "\n".join(lines) + "\n"


def prepare(tmp: Path, name: str = "data", text: str | None = None, **kwargs: Any) -> Path:
    """Write ``text`` (default ``corpus_text()``) to ``tmp/name.txt`` and prepare it into ``tmp/name``."""
    src = tmp / f"{name}.txt"
    src.write_text(corpus_text() if text is None else text, encoding="utf-8")
    data.prepare(str(src), tmp / name, block_size=BLOCK, **kwargs)
    return tmp / name


def tiny(**overrides: Any) -> tuple[config.ModelConfig, config.TrainConfig]:
    """Preset "tiny" at context 16, fp32 on CPU, with ``overrides``."""
    values = {"block_size": BLOCK, "dtype": "fp32", "device": "cpu", **overrides}
    return config.resolve("tiny", overrides=values)


@contextlib.contextmanager
def trainer(data_dir: Path, run_dir: Path, **overrides: Any) -> Iterator[Trainer]:
    """A ``Trainer`` built (not run) on a tiny config; its run lock is released afterwards."""
    init_from, resume = overrides.pop("init_from", None), overrides.pop("resume", False)
    model_cfg, train_cfg = tiny(**overrides)
    t = Trainer(data_dir, run_dir, model_cfg, train_cfg, init_from=init_from, resume=resume)
    try:
        yield t
    finally:
        if t.lock:
            t.lock.release()


def train_args(data_dir: Path, run_dir: Path, *extra: object) -> list[str]:
    """``minigpt2 train`` of the tiny preset at context 16 (a resume: with the run's own settings)."""
    preset = [] if "--resume" in extra else ["--preset", "tiny"]
    base = ["train", "--data", data_dir, "--out", run_dir, *preset, "--block-size", BLOCK]
    return [str(a) for a in (*base, "--dtype", "fp32", "--device", "cpu", *extra)]


def main(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """``minigpt2 ARGS`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(rc: int, err: str) -> str:
    """The CLI's contract for bad input: status 2, one ``error:`` line on stderr, no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env


def run_module(*args: object, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m ARGS`` in a subprocess (e.g. ``run_module("minigpt2", "train", ...)``)."""
    return subprocess.run(
        [sys.executable, "-m", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=subprocess_env(), timeout=timeout,
    )  # fmt: skip


def rows(run_dir: Path) -> list[dict[str, float]]:
    return read_metrics(run_dir / "metrics.csv")


def meta(ckpt_dir: Path) -> dict[str, Any]:
    return json.loads((ckpt_dir / "checkpoint.json").read_text(encoding="utf-8"))


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
