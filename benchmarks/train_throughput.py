"""Training throughput: the default fast path against the readable reference path, same script.

    python benchmarks/train_throughput.py --preset shakespeare --batch-size 64
    python benchmarks/train_throughput.py --preset cpu
    python benchmarks/train_throughput.py --preset tiny

Both paths run the real ``Trainer`` (data sampling, LR schedule, clipping, optimizer) on the
first 1,115,394 characters of Shakespeare, with freed memory kept for reuse on a CPU for both, so
that the ratio measures the model's pieces (``fast/memory.py``; ``--engine reference`` training
does not keep it). Reference: ``engine="reference"`` (the textbook model), fp32, eager, written-out
attention, one pass. Fast: the defaults (``engine="fast"``: the drop-ins of ``minigpt2/fast``;
``--dtype auto``: bf16 autocast on a CPU with bf16 units; fused AdamW; batches cut into passes of
at most 4,096 tokens on a CPU). Each configuration runs
in its own process so that peak memory (RSS) is its own, and the paths take turns for ``--rounds``
rounds (medians; each round's tokens/s is shown). Reports tokens/s, the speed-up, model FLOP
utilisation against the fastest matmul dtype's peak (bf16, or fp32 where bf16 is emulated: chosen
once, then timed in each path's process right after each of its steps, so that the machine's drift
moves both sides of the ratio), the share of step time outside forward/backward
(Python overhead, and the optimizer), the optimizer's own share (Muon's matrix products, for the
presets that use it: compare ``--paths reference,fast,fast-adamw``), and peak RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    cpu_model,
    emit,
    fastest_matmul_tflops,
    matmul_tflops,
    print_table,
    shakespeare_prefix_data,
    sync,
)

from minigpt2.core import config
from minigpt2.fast.memory import keep_freed_memory
from minigpt2.training.trainer import Trainer

ONE_PASS = 10**9  # max_pass_tokens that never cuts a batch
PATHS = {
    # The textbook: fp32, written-out attention, torch's dropout, the whole batch in one pass.
    "reference": dict(engine="reference", dtype="fp32", attn_impl="manual", compile=False,
                      max_pass_tokens=ONE_PASS),
    # The defaults: the engine, bf16 autocast, passes of <= 4096 tokens on CPU.
    "fast": dict(engine="fast", dtype="auto", compile=False),
    "fast+compile": dict(engine="fast", dtype="auto", compile=True),
    # Variants, to see what each part is worth.
    "fast-onepass": dict(engine="fast", dtype="auto", compile=False, max_pass_tokens=ONE_PASS),
    # The textbook model with the same precision and passes as the defaults: what the engine adds.
    "textbook-bf16": dict(engine="reference", dtype="auto", attn_impl="sdpa", compile=False),
    # The fast path with AdamW for every weight, for presets that use Muon (what Muon costs a step).
    "fast-adamw": dict(engine="fast", dtype="auto", compile=False, optimizer="adamw"),
    # What a CPU without bf16 units (most laptops) runs by default: the fast path in fp32.
    "fast-fp32": dict(engine="fast", dtype="fp32", compile=False),
}  # fmt: skip


def measure(
    preset: str, path: str, batch_size: int | None, steps: int, warmup: int, peak_dtype: torch.dtype
) -> dict[str, Any]:
    """Run ``warmup + steps`` optimizer steps of one path in this process; time the last ``steps``,
    and after each the ``peak_dtype`` matmul's peak (for the step's MFU)."""
    overrides = dict(PATHS[path], max_iters=10_000, eval_interval=10_000, early_stopping=False)
    if batch_size:
        overrides["batch_size"] = batch_size
    model_cfg, train_cfg = config.resolve(preset, overrides=overrides)
    data_dir = shakespeare_prefix_data(model_cfg.block_size)
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(data_dir, Path(run_dir), model_cfg, train_cfg)
        # For both paths (see the docstring): on a CPU, freed activations are kept for reuse.
        memory = keep_freed_memory() if trainer.parts.device.type == "cpu" else contextlib.nullcontext()
        stack.enter_context(memory)
        for _ in range(warmup):
            trainer.train_step()
        # The optimizer's share of a step (AdamW, or Muon's matrix products + AdamW), timed inside it.
        optimizer_times: list[float] = []
        optimizer_step = trainer.parts.optimizer.step

        def timed_optimizer_step() -> None:
            sync(trainer.parts.device)  # on a GPU: time the kernels, not their launch
            start = time.perf_counter()
            optimizer_step()
            sync(trainer.parts.device)
            optimizer_times.append(time.perf_counter() - start)

        trainer.parts.optimizer.step = timed_optimizer_step  # type: ignore[method-assign]
        # Forward+backward alone on one fixed batch, timed right after each whole step (the speed of
        # this machine drifts by the minute), splits compute from overhead: medians of both.
        passes = list(trainer.parts.batches.passes())
        step_times, compute_times, peaks = [], [], []
        for _ in range(steps):
            sync(trainer.parts.device)
            start = time.perf_counter()
            trainer.train_step()  # ends with the gradients set to None, as before a real step
            sync(trainer.parts.device)
            step_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            for x, y, weight in passes:
                with trainer.parts.precision.autocast():
                    _, loss = trainer.parts.model(x, y)
                assert loss is not None
                (loss * weight).backward()
            sync(trainer.parts.device)
            compute_times.append(time.perf_counter() - start)
            trainer.parts.optimizer.zero_grad(set_to_none=True)
            peaks.append(matmul_tflops(peak_dtype, trainer.parts.device, seconds=0.5))
        step_s, compute_s = statistics.median(step_times), statistics.median(compute_times)
        tokens = trainer.parts.global_batch * train_cfg.grad_accum * model_cfg.block_size
        flops_per_token = trainer.parts.raw_model.flops_per_token()
        mfus = [flops_per_token * tokens / s / 1e12 / peak for s, peak in zip(step_times, peaks, strict=True)]
        if trainer.lock:
            trainer.lock.release()
    return {
        "tokens_per_s": tokens / step_s,
        "step_s": step_s,
        "overhead_share": max(0.0, 1 - compute_s / step_s),
        "optimizer_share": statistics.median(optimizer_times) / step_s,
        "model_tflops": flops_per_token * tokens / step_s / 1e12,
        "peak_tflops": statistics.median(peaks),
        "mfu": statistics.median(mfus),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "precision": trainer.parts.precision.name,
        "optimizer": train_cfg.optimizer,
        "params": trainer.parts.raw_model.num_params(),
        "device": trainer.parts.device.type,
        # False when torch.compile was asked for but failed and the trainer fell back to eager.
        "compiled": trainer.parts.model is not trainer.parts.raw_model,
    }


def _row(path: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One path's table row: the medians of its rounds (peak RSS: the largest), and each round's
    tokens/s and MFU."""
    row: dict[str, Any] = {"path": path, **runs[-1]}
    for key in ("tokens_per_s", "step_s", "overhead_share", "optimizer_share", "model_tflops",
                "peak_tflops", "mfu"):  # fmt: skip
        row[key] = statistics.median(r[key] for r in runs)
    row["peak_rss_gib"] = max(r["peak_rss_gib"] for r in runs)
    row["rounds"] = " ".join(f"{r['tokens_per_s']:.0f}/{r['mfu']:.0%}" for r in runs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="shakespeare")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--paths", default="reference,fast")
    parser.add_argument("--rounds", type=int, default=3, help="the paths take turns this many times")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one path, print JSON
    parser.add_argument("--peak-dtype", help=argparse.SUPPRESS)  # internal: the peak's dtype
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    if args.one:
        dtype = getattr(torch, args.peak_dtype)
        print(json.dumps(measure(args.preset, args.one, args.batch_size, args.steps, args.warmup, dtype)))
        return
    # The fastest matmul dtype here, chosen once; each path times its peak beside its own steps.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _, peak_dtype = fastest_matmul_tflops(device)
    # The paths take turns for --rounds rounds, each run in its own process, and each reports its
    # medians: this machine's speed drifts by the minute (one path's good minute against another's
    # bad one read 3.0x and 4.5x for the same code, two minutes apart).
    paths = args.paths.split(",")
    runs: dict[str, list[dict[str, Any]]] = {path: [] for path in paths}
    for _ in range(args.rounds):
        for path in paths:
            cmd = [sys.executable, __file__, "--one", path, "--preset", args.preset,
                   "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--peak-dtype", {"fp32": "float32", "bf16": "bfloat16"}[peak_dtype]]  # fmt: skip
            if args.batch_size:
                cmd += ["--batch-size", str(args.batch_size)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:  # report it, keep the other paths' rows
                print(f"path {path} failed:\n" + "\n".join(done.stderr.strip().splitlines()[-15:]),
                      file=sys.stderr)  # fmt: skip
                continue
            runs[path].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = [_row(path, found) for path, found in runs.items() if found]
    if not rows:
        raise SystemExit("every path failed")
    peak = statistics.median(r["peak_tflops"] for found in runs.values() for r in found)
    ref = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / ref
    print(
        f"preset {args.preset}, batch {args.batch_size or 'preset'}, {rows[0]['device']};"
        f" fastest matmul peak here {peak:.3f} TFLOP/s in {peak_dtype} (median of every path's);"
        f" {cpu_model()}"
    )
    print_table(rows, ["path", "precision", "optimizer", "compiled", "tokens_per_s", "speedup", "step_s",
                       "overhead_share", "optimizer_share", "model_tflops", "mfu",
                       "peak_rss_gib", "rounds"])  # fmt: skip
    # The fastest way to train this recipe (fast-adamw is another recipe: it only shows Muon's cost;
    # fast-fp32 is what another machine gets).
    best = max(
        [r for r in rows if r["path"] not in ("fast-adamw", "fast-fp32")] or rows,
        key=lambda r: r["tokens_per_s"],
    )
    emit({"preset": args.preset, "reference_tokens_per_s": ref, "tokens_per_s": best["tokens_per_s"],
          "ratio": best["speedup"], "mfu": best["mfu"], "peak_tflops": peak, "peak_dtype": peak_dtype,
          "cpu": cpu_model(),
          "overhead_share": best["overhead_share"], "optimizer_share": best["optimizer_share"],
          "peak_rss_gib": best["peak_rss_gib"],
          "best_path": best["path"]})  # fmt: skip


if __name__ == "__main__":
    main()
