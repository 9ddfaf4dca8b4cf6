"""What this machine measurably does, timed once and remembered: whether bf16 pays on its CPU.

A CPU's flags say what the chip has, not what PyTorch does with it here: on a CPU without native
bf16 (most laptops: AVX2 only) PyTorch emulates bf16 products about 100x slower than fp32, and an
instruction set restricted by ``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA`` turns an AMX CPU into
one of those while its flags still say AMX. So ``--dtype auto`` times it instead:

- ``cpu_bf16_is_fast``: a bf16 matrix product against the same in fp32 (512 x 512 x 512, a few
  milliseconds; where bf16 is emulated, one 0.2 s product settles it). Muon's orthogonalisation
  and autocast both ask it.
- ``cpu_autocast_pays(tokens, width)``: where bf16 products are fast, one MLP of the run's shape
  (``tokens`` x ``width`` -> 4 ``width`` -> ``width``, forward and backward) under bf16 autocast
  against fp32, the casts included; bf16 must be 10% faster, since the rest of a step (layer norms,
  softmax, the optimizer) gains nothing from it.

Both are timed on one thread (a ratio of two dtypes on one core is what decides, and one thread is
the least disturbed by other work on a busy machine), fastest of five. Each answer is kept in
``CACHE/machine.json`` (``corpora.cache_dir``) under a key naming what it depends on: the CPU model,
PyTorch's version and the instruction set it runs, and the restrictions in the environment; a
machine that cannot write there measures again.
Tests: ``pytest tests/hardware/test_machine.py``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from minigpt2.core.config import TrainConfig
from minigpt2.fast.gelu import ISA_VARIABLES  # restricting the instruction set
from minigpt2.storage.fileio import atomic_write_text

CACHE_FILE = "machine.json"
AUTOCAST_GAIN = 0.9  # bf16 autocast must take at most this share of fp32's time to be chosen


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), or what ``platform`` says elsewhere."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_description() -> str:
    """The CPU's model and the instruction set PyTorch runs on it, with the restrictions set in
    the environment: what a figure measured here should be labelled with."""
    restricted = [f"{v}={os.environ[v]}" for v in ISA_VARIABLES if os.environ.get(v)]
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{cpu_model()} ({isa}" + (f", restricted: {' '.join(restricted)})" if restricted else ")")


def machine_key() -> str:
    """What a CPU measurement depends on, as one string."""
    isa = ",".join(f"{v}={os.environ.get(v, '')}" for v in ISA_VARIABLES)
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{cpu_model()}|torch {torch.__version__} {capability}|{isa}"


def _cache_path() -> Path:
    from minigpt2.data.corpora import cache_dir

    return cache_dir() / CACHE_FILE


def remembered(name: str, measure: Callable[[], bool]) -> bool:
    """``measure()``'s answer for ``name`` on this machine: from the cache, or measured now and
    kept there (an unreadable or unwritable cache only costs the measurement)."""
    key = f"{machine_key()}|{name}"
    path = _cache_path()
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    if isinstance(cache.get(key), bool):
        return bool(cache[key])
    with torch.random.fork_rng(devices=[]):  # its random matrices leave a run's random state as it was
        answer = measure()
    cache[key] = answer
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(cache, indent=1))
    return answer


def time_once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fastest_time(fn: Callable[[], object], repeats: int = 5) -> float:
    """The shortest of ``repeats`` timed calls of ``fn``, after one untimed call (allocation,
    kernel choice): the least disturbed by whatever else the machine is doing."""
    fn()
    return min(time_once(fn) for _ in range(repeats))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _matmul_ratio() -> float:
    """bf16's time over fp32's for a 512 x 512 x 512 product; an emulated bf16 (30-100x slower) is
    known from its first product, without repeating it."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a16, b16 = a.bfloat16(), b.bfloat16()
    with one_thread():
        fp32 = fastest_time(lambda: a @ b)
        first = time_once(lambda: a16 @ b16)
        if first > 4 * fp32:
            return first / fp32
        return fastest_time(lambda: a16 @ b16) / fp32


@functools.cache  # asked at every Muon step: measured (or read) once per process
def cpu_bf16_is_fast() -> bool:
    """Whether this CPU, as PyTorch runs it here, multiplies bf16 matrices faster than fp32 ones."""
    return remembered("bf16 matmul", lambda: _matmul_ratio() < 1.0)


def _mlp_time(tokens: int, width: int, autocast: bool) -> float:
    """Forward and backward of one GPT-2 MLP on ``tokens`` x ``width`` activations, in seconds."""
    x = torch.randn(tokens, width, requires_grad=True)
    w1 = (torch.randn(4 * width, width) * 0.02).requires_grad_()
    w2 = (torch.randn(width, 4 * width) * 0.02).requires_grad_()

    def step() -> None:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            out = F.linear(F.gelu(F.linear(x, w1), approximate="tanh"), w2)
        loss: torch.Tensor = out.float().sum()
        torch.autograd.backward(loss)

    return fastest_time(step)


@functools.cache
def cpu_autocast_pays(tokens: int, width: int) -> bool:
    """Whether bf16 autocast makes a training pass of ``tokens`` x ``width`` faster on this CPU."""
    if not cpu_bf16_is_fast():
        return False

    def measure() -> bool:
        with one_thread():
            return _mlp_time(tokens, width, True) < AUTOCAST_GAIN * _mlp_time(tokens, width, False)

    return remembered(f"bf16 autocast {tokens}x{width}", measure)


def muon_dtype(device: torch.device, cfg: TrainConfig) -> torch.dtype | None:
    """The dtype of Muon's Newton-Schulz products on ``device`` (None: ``cfg`` has no Muon): bf16
    where the hardware computes in it (a CUDA GPU with bf16, a CPU measured to multiply bf16 faster:
    AMX, AVX512-BF16), else fp32: elsewhere bf16 products are emulated (slow) or missing."""
    if cfg.optimizer != "muon":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_bf16_is_fast():
        return torch.bfloat16
    return torch.float32
