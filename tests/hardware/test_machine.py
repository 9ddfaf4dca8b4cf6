"""Tests for ``minigpt2.hardware.machine``: bf16 on a CPU decided by measurement, remembered per machine.

The decisions are checked with timings the test chooses (no test depends on this machine's speed):
emulated bf16 is never chosen, fast bf16 is chosen only where autocast gains 10%, an answer is
measured once and read back from ``CACHE/machine.json``, a damaged cache is measured again, and the
key changes with the instruction-set restrictions. The real measurements run once, for their type.
Run with ``pytest tests/hardware/test_machine.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from minigpt2.hardware import machine
from minigpt2.hardware.precision import choose_precision


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    machine.cpu_bf16_is_fast.cache_clear()
    machine.cpu_autocast_pays.cache_clear()
    yield
    machine.cpu_bf16_is_fast.cache_clear()
    machine.cpu_autocast_pays.cache_clear()


def timings(
    monkeypatch: pytest.MonkeyPatch, matmul: dict[torch.dtype, float], mlp: dict[bool, float]
) -> list[str]:
    """Replace the timed pieces by ``matmul`` (seconds by dtype) and ``mlp`` (by autocast);
    returns the log of what was timed."""
    timed: list[str] = []

    def fake_matmul() -> float:
        timed.append("matmul")
        return matmul[torch.bfloat16] / matmul[torch.float32]

    def fake_mlp(tokens: int, width: int, autocast: bool) -> float:
        timed.append(f"mlp {tokens}x{width} {autocast}")
        return mlp[autocast]

    monkeypatch.setattr(machine, "_matmul_ratio", fake_matmul)
    monkeypatch.setattr(machine, "_mlp_time", fake_mlp)
    return timed


EMULATED = {torch.bfloat16: 0.03, torch.float32: 0.0003}
NATIVE = {torch.bfloat16: 0.0001, torch.float32: 0.0003}


def test_emulated_bf16_is_never_chosen_and_not_timed_further(monkeypatch: pytest.MonkeyPatch) -> None:
    timed = timings(monkeypatch, EMULATED, {True: 0.001, False: 1.0})
    assert not machine.cpu_autocast_pays(4096, 256)
    assert choose_precision(torch.device("cpu"), "auto", work=10**9, shape=(4096, 256)).name == "fp32"
    assert timed == ["matmul"]  # no MLP: bf16 is ruled out


@pytest.mark.parametrize(
    ("bf16", "fp32", "chosen"), [(0.5, 1.0, True), (0.95, 1.0, False), (2.0, 1.0, False)]
)
def test_fast_bf16_is_chosen_where_autocast_gains_ten_percent(
    monkeypatch: pytest.MonkeyPatch, bf16: float, fp32: float, chosen: bool
) -> None:
    timings(monkeypatch, NATIVE, {True: bf16, False: fp32})
    assert machine.cpu_autocast_pays(4096, 256) == chosen
    precision = choose_precision(torch.device("cpu"), "auto", work=10**9, shape=(4096, 256))
    assert precision.name == ("bf16" if chosen else "fp32") and "measured" in precision.reason
    # Tiny work and one-character generation stay fp32 without any timing.
    assert choose_precision(torch.device("cpu"), "auto", work=1000).name == "fp32"
    assert choose_precision(torch.device("cpu"), "auto", inference=True).name == "fp32"


def test_an_answer_is_measured_once_per_machine_and_read_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    timed = timings(monkeypatch, NATIVE, {True: 0.5, False: 1.0})
    assert machine.cpu_autocast_pays(4096, 256)
    cache = json.loads((tmp_path / "cache" / machine.CACHE_FILE).read_text())
    assert sorted(k.rsplit("|", 1)[1] for k in cache) == ["bf16 autocast 4096x256", "bf16 matmul"]
    first = len(timed)
    machine.cpu_bf16_is_fast.cache_clear()
    machine.cpu_autocast_pays.cache_clear()  # a new process: the file answers
    assert machine.cpu_autocast_pays(4096, 256) and len(timed) == first
    assert machine.cpu_autocast_pays(4096, 128) and len(timed) == first + 2  # another shape: timed
    # Another instruction set is another machine.
    other = "SSE41" if os.environ.get("ONEDNN_MAX_CPU_ISA") != "SSE41" else "AVX2"  # not the one set now
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", other)
    machine.cpu_bf16_is_fast.cache_clear()
    machine.cpu_autocast_pays.cache_clear()
    assert machine.cpu_autocast_pays(4096, 256) and len(timed) == first + 5


@pytest.mark.parametrize("damage", ["not json", "[1, 2]", '{"x": 3}'])
def test_a_damaged_or_unwritable_cache_only_costs_a_measurement(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, damage: str
) -> None:
    timings(monkeypatch, EMULATED, {True: 1.0, False: 1.0})
    path = tmp_path / "cache" / machine.CACHE_FILE
    path.parent.mkdir(parents=True)
    path.write_text(damage)
    assert not machine.cpu_bf16_is_fast()
    assert json.loads(path.read_text())  # rewritten whole
    machine.cpu_bf16_is_fast.cache_clear()
    monkeypatch.setenv("MINIGPT2_CACHE", str(path))  # a file, not a folder: nothing can be kept
    assert not machine.cpu_bf16_is_fast()


def test_the_real_measurements_answer() -> None:
    assert isinstance(machine.cpu_bf16_is_fast(), bool)
    assert isinstance(machine.cpu_autocast_pays(512, 64), bool)
    assert machine.fastest_time(lambda: None, repeats=2) >= 0


def test_figures_name_the_cpu_and_any_restriction_of_its_instruction_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in machine.ISA_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    plain = machine.cpu_description()
    assert machine.cpu_model() in plain and "restricted" not in plain
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert machine.cpu_description().endswith("restricted: ONEDNN_MAX_CPU_ISA=AVX2)")
