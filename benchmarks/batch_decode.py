"""Batched decoding: characters/s of many rows advanced together against one row of ``generate_ids``.

    python benchmarks/batch_decode.py                 # cpu preset: 1, 5, 20, 50 rows; shakespeare: 1 row

Weights are random (speed does not depend on them); the vocabulary is the Shakespeare source's
(~90 ids with the special tokens). Each row samples (temperature 0.8, top-k 40, its own seed)
``--new-chars`` characters after a 3-id prompt, well past the context window, so every row slides
and refills; no stop ids, so every row runs to the end. The reference is one row through
``generate_ids`` on the engine (``speed_up``: the flat one-token step), fp32, in the same run; the
batched paths are ``generate_many`` with that many rows (``minigpt2.fast.batch_decoder``), fp32. Figures are
characters/s summed over all rows; ``per_row`` is what each conversation sees. The paths take turns
for ``--rounds`` rounds (median of each; every round's figure is shown).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_model, emit, print_table

from minigpt2.core import config
from minigpt2.core.config import SampleConfig
from minigpt2.core.generate import make_generator
from minigpt2.core.model import GPT
from minigpt2.core.stream import generate_ids
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.fast import speed_up
from minigpt2.fast.batch_decoder import generate_many

VOCAB = sorted(set("\n !&'(),-.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz[]_0123456789\""))


def make_model(preset: str) -> GPT:
    model_cfg, _ = config.resolve(preset, overrides={"vocab_size": CharTokenizer(VOCAB).vocab_size})
    torch.manual_seed(0)
    return speed_up(GPT(model_cfg)).eval()


def one_row(model: GPT, n: int) -> float:
    cfg = SampleConfig(max_new_tokens=n, temperature=0.8, top_k=40, seed=0)
    start = time.perf_counter()
    count = sum(1 for _ in generate_ids(model, [5, 6, 7], cfg))
    return count / (time.perf_counter() - start)


def batched(model: GPT, rows: int, n: int) -> float:
    cfg = SampleConfig(max_new_tokens=n, temperature=0.8, top_k=40)
    prompts = [[5 + i % 50, 6, 7] for i in range(rows)]
    gens = [make_generator(i) for i in range(rows)]
    start = time.perf_counter()
    count = sum(1 for _ in generate_many(model, prompts, cfg, generators=gens, max_rows=rows))
    return count / (time.perf_counter() - start)


def measure(preset: str, row_counts: list[int], n: int, rounds: int) -> list[dict[str, object]]:
    """One table row per path: the reference (rows 0 below: one row through generate_ids), then
    ``generate_many`` with each count of rows."""
    model = make_model(preset)
    one_row(model, 50)  # warm-up
    batched(model, max(row_counts), 20)
    paths = [0, *row_counts]
    # Paths take turns, round after round: this machine's speed drifts within a minute.
    speeds: dict[int, list[float]] = {k: [] for k in paths}
    for _ in range(rounds):
        for k in paths:
            speeds[k].append(one_row(model, n) if k == 0 else batched(model, k, n))
    ref = statistics.median(speeds[0])
    return [{"shape": preset, "path": "generate_ids (engine)" if k == 0 else "batched", "rows": max(k, 1),
             "chars_per_s": statistics.median(v), "per_row": statistics.median(v) / max(k, 1),
             "ratio": statistics.median(v) / ref, "rounds": " ".join(f"{x:.0f}" for x in v)}
            for k, v in speeds.items()]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="1,5,20,50", help="row counts for the cpu preset")
    parser.add_argument("--new-chars", type=int, default=300, help="characters per row")
    parser.add_argument("--rounds", type=int, default=3, help="the paths take turns this many times")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    row_counts = [int(r) for r in args.rows.split(",")]
    table = measure("cpu", row_counts, args.new_chars, args.rounds)
    table += measure("shakespeare", [1], args.new_chars, args.rounds)
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, fp32, {args.new_chars} new characters per row")
    print_table(table, ["shape", "path", "rows", "chars_per_s", "per_row", "ratio", "rounds"])
    batched_rows = [r for r in table if r["path"] == "batched"]
    emit({"cpu": cpu_model(), "threads": torch.get_num_threads(), "new_chars": args.new_chars,
          "chars_per_s": {f"{r['shape']} {r['path']} {r['rows']}": r["chars_per_s"] for r in table},
          "ratio": {f"{r['shape']} {r['rows']}": r["ratio"] for r in batched_rows}})  # fmt: skip


if __name__ == "__main__":
    main()
