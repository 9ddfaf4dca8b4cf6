"""Int8 decoding weights against fp32, by model size: one stream, and batched steps of 1, 5 and 20 rows.

    python benchmarks/int8_speed.py                       # tiny, cpu, chat and shakespeare presets
    python benchmarks/int8_speed.py --presets chat --rounds 7

Random weights (speed does not depend on them). For each preset: one stream (``generate_ids`` on
the engine, greedy, one context window after a 3-character prompt) with ``decode_weights`` fp32 and
int8, taking turns for ``--rounds`` rounds; then the batched step alone (``BatchStep``, what the
server runs) for 1, 5 and 20 rows at mixed lengths, fp32 and int8 in turns. Reported: medians and
int8's ratio to fp32. The rule behind ``--decode-weights auto`` (int8 from 4 MiB of the blocks'
fp32 weights) comes from these ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import batch_stepper, cpu_model, emit, print_table, step_ms

from minigpt2.core import config
from minigpt2.core.config import SampleConfig
from minigpt2.core.model import GPT
from minigpt2.core.stream import generate_ids
from minigpt2.fast import speed_up
from minigpt2.fast.decode import FastGPT

WEIGHTS = ("fp32", "int8")


def stream_speed(model: FastGPT, weights: str) -> float:
    """Characters/s of one greedy stream filling the context window."""
    model.decode_weights = weights
    cfg = SampleConfig(max_new_tokens=model.config.block_size - 3, temperature=0.0)
    start = time.perf_counter()
    ids = list(generate_ids(model, [5, 6, 7], cfg))
    return len(ids) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="tiny,cpu,chat,shakespeare")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows_out = []
    for preset in args.presets.split(","):
        model_cfg, _ = config.resolve(preset, overrides={"vocab_size": 65, "dropout": 0.0})
        torch.manual_seed(0)
        model = speed_up(GPT(model_cfg)).eval()
        assert isinstance(model, FastGPT)
        mib = 4 * sum(p.numel() for p in model.transformer.h.parameters()) / 2**20
        streams: dict[str, list[float]] = {w: [] for w in WEIGHTS}
        for _ in range(args.rounds):
            for w in WEIGHTS:
                streams[w].append(stream_speed(model, w))
        row = {"preset": preset, "block_MiB": mib}
        row.update({f"{w}_chars_per_s": statistics.median(streams[w]) for w in WEIGHTS})
        row["stream_ratio"] = row["int8_chars_per_s"] / row["fp32_chars_per_s"]
        for n in (1, 5, 20):
            decoders = {w: batch_stepper(model, w, n) for w in WEIGHTS}
            times: dict[str, list[float]] = {w: [] for w in WEIGHTS}
            for _ in range(args.rounds):
                for w in WEIGHTS:
                    times[w].append(step_ms(decoders[w]))
            row[f"rows{n}_ms_fp32_int8"] = (
                f"{statistics.median(times['fp32']):.2f} {statistics.median(times['int8']):.2f}"
            )
            row[f"rows{n}_ratio"] = statistics.median(times["fp32"]) / statistics.median(times["int8"])
        rows_out.append(row)
    print(f"{cpu_model()}, {torch.get_num_threads()} threads; medians of {args.rounds} rounds taken in turns")
    print_table(rows_out, list(rows_out[0]))
    emit({"rows": rows_out})


if __name__ == "__main__":
    main()
