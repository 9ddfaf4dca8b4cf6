"""Tests for ``minigpt2.fast.memory``: freed memory kept for reuse while training on a CPU.

Page faults are counted with ``getrusage``: a large block freed and allocated again faults its
pages back in unless malloc kept it; resident memory is read from ``/proc/self/statm``.
Run with ``pytest tests/fast/test_cpu_memory.py``.
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from minigpt2.fast import memory as cpu_memory
from minigpt2.fast.memory import keep_freed_memory

glibc_only = pytest.mark.skipif(cpu_memory._glibc() is None, reason="needs Linux with glibc")
BLOCK = 24 * 1024 * 1024  # bytes: bigger than glibc's default thresholds, under the kept size
PAGES = BLOCK // 4096


def faults_per_round(rounds: int = 8) -> float:
    """Minor page faults per allocation, write and free of one BLOCK-sized array."""
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        block = torch.empty(BLOCK, dtype=torch.uint8)  # (numpy asks for huge pages: fewer faults)
        block.fill_(1)  # touch every page
        del block
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / rounds


def rss_bytes() -> int:
    """This process's resident memory now (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


@glibc_only
def test_freed_blocks_are_reused_inside_and_given_back_after() -> None:
    with keep_freed_memory() as applied:
        assert applied
        faults_per_round(24)  # new memory at first, while the heap grows to its working size
        assert faults_per_round() < PAGES / 10  # then the same memory again: no faults
        kept = rss_bytes()  # the last block is freed, but still resident
    # On leaving, what was freed goes back to the system.
    assert kept - rss_bytes() > BLOCK / 2


def test_elsewhere_it_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_memory, "_glibc", lambda: None)  # macOS, Windows, musl
    with keep_freed_memory() as applied:
        assert not applied


def test_cpu_training_keeps_freed_memory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The training loop runs inside ``keep_freed_memory`` on a CPU, and leaves it at the end."""
    from helpers_train import prepare, tiny
    from minigpt2.training import trainer as train

    events = []

    @contextlib.contextmanager
    def recording() -> Iterator[bool]:
        events.append("enter")
        yield True
        events.append("exit")

    monkeypatch.setattr(train, "keep_freed_memory", recording)
    model_cfg, train_cfg = tiny(max_iters=3, eval_interval=3)
    train.train(prepare(tmp_path), tmp_path / "run", model_cfg, train_cfg)
    assert events == ["enter", "exit"]
