"""Shared pieces of the benchmarks: a prepared corpus, a peak matmul rate, the batched step's time,
and result printing.

Every benchmark compares against a reference measured in the same script, prints a table, and
ends with one JSON line of its figures.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from minigpt2 import data
from minigpt2.core.config import SampleConfig
from minigpt2.core.model import GPT
from minigpt2.data import corpora
from minigpt2.fast.batch_decoder import BatchDecoder
from minigpt2.hardware.machine import cpu_bf16_is_fast, cpu_description
from minigpt2.storage.fileio import atomic_write_text

CLASSIC_CHARS = 1_115_394  # the size of the classic tiny-shakespeare corpus


def shakespeare_prefix_data(block_size: int, chars: int = CLASSIC_CHARS) -> Path:
    """A data folder of the first ``chars`` characters of the ``shakespeare`` source (cached)."""
    root = Path(os.environ.get("MINIGPT2_BENCH_DIR", Path(tempfile.gettempdir()) / "minigpt2-bench"))
    out = root / f"shakespeare-{chars}"
    if not (out / "meta.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        text_file = root / f"shakespeare-{chars}.txt"
        atomic_write_text(text_file, corpora.shakespeare_text()[:chars])
        data.prepare(str(text_file), out, val_fraction=0.1, block_size=block_size)
    return out


def matmul_tflops(dtype: torch.dtype, device: str | torch.device = "cpu", seconds: float = 2.0) -> float:
    """Achieved TFLOP/s of a square matmul in ``dtype`` on ``device``: the machine's practical peak
    (n = 2048 on a CPU, 8192 on a GPU)."""
    device = torch.device(device)
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        if count % 10 == 0:  # a GPU queues work: wait for it now and then, and at the end
            sync(device)
    sync(device)
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e12


def fastest_matmul_tflops(device: str | torch.device = "cpu") -> tuple[float, str]:
    """The practical peak of the fastest matmul dtype here, and its name: bf16 or fp32 (on a CPU
    whose bf16 PyTorch emulates, fp32 alone is timed: a 2048-wide bf16 product takes ~20 s there)."""
    device = torch.device(device)
    fp32 = matmul_tflops(torch.float32, device)
    if device.type == "cpu" and not cpu_bf16_is_fast():
        return fp32, "fp32"
    bf16 = matmul_tflops(torch.bfloat16, device)
    return (bf16, "bf16") if bf16 > fp32 else (fp32, "fp32")


def batch_stepper(model: GPT, weights: str, rows: int) -> BatchDecoder:
    """A batched decoder with ``rows`` rows of different lengths, one step taken."""
    model.decode_weights = weights
    decoder = BatchDecoder(model, max_rows=rows)
    for i in range(rows):
        length = 1 + (7 * i) % (model.config.block_size // 2)  # mixed lengths within half a window
        decoder.add([1 + i % 5] * length, SampleConfig(max_new_tokens=10**6, seed=i))
    decoder.step()
    return decoder


@torch.inference_mode()
def step_ms(decoder: BatchDecoder, steps: int = 20) -> float:
    """Milliseconds of one batched model step (the forward pass only) over the decoder's rows."""
    rows = decoder.rows
    ids = torch.tensor([r.tokens[-1] for r in rows])
    pos = torch.tensor([r.length for r in rows])
    start = time.perf_counter()
    for _ in range(steps):
        decoder.batch(ids, pos, int(pos.max()) + 1, ragged=True)
    return (time.perf_counter() - start) / steps * 1e3


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    """The CPU as figures name it: its model, the instruction set PyTorch uses on it, and any
    restriction of that set in the environment (an AVX-512 CPU run as an AVX2 one says so)."""
    return cpu_description()


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return "" if value is None else str(value)


def emit(figures: dict[str, Any]) -> None:
    """The last line of every benchmark: its figures as one JSON object."""
    sys.stdout.flush()
    print(json.dumps(figures))
