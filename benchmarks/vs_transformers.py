"""One stream against Hugging Face transformers: the same GPT-2, the same weights, the same machine.

    python benchmarks/vs_transformers.py                 # shakespeare shape (6 x 384, context 256)
    python benchmarks/vs_transformers.py --preset chat

Random weights (speed does not depend on them), copied into ``transformers.GPT2LMHeadModel`` the way
``minigpt2 export`` maps them. Both generate ``--new`` characters greedily after a 3-character prompt,
inside one context window (transformers' ``generate`` cannot go past it; minigpt2's would slide), with
their KV caches: ``GPT2LMHeadModel.generate`` in fp32, and minigpt2's engine (``speed_up``) in fp32,
under bf16 autocast and with int8 decoding weights (``fast/int8.py``: what ``--decode-weights
auto`` picks on a CPU for blocks of 4 MiB or more in fp32). The paths take turns for ``--rounds`` rounds
(medians). Both produce the same ids in fp32 (checked), so the comparison is of the same work
(int8 weights change the numbers: ``benchmarks/decode_weights.py`` measures by how much).

It also measures how fast this machine reads memory (summing a 512 MiB tensor on every thread) and
prints the ceiling that sets at batch 1: each character reads every weight once, so no path can
write more than (read rate) / (bytes of weights) characters a second at that precision.
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
from minigpt2.core.model import GPT
from minigpt2.core.stream import generate_ids
from minigpt2.exports.hf import _conv1d, _hf_config
from minigpt2.fast import speed_up
from minigpt2.fast.decode import FastGPT
from minigpt2.fast.int8 import choose_decode_weights
from minigpt2.hardware.precision import choose_precision

PROMPT = [5, 6, 7]


def hf_twin(model: GPT) -> torch.nn.Module:
    """``GPT2LMHeadModel`` holding ``model``'s weights (Conv1D layers take them transposed)."""
    import transformers

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**_hf_config(model.config))).eval()
    weights = {n: (t.t() if _conv1d(n) else t).contiguous() for n, t in model.state_dict().items()}
    hf.load_state_dict(weights, strict=False)
    return hf


def ours(model: FastGPT, new: int, dtype: str, weights: str = "fp32") -> tuple[float, list[int]]:
    model.decode_weights = weights
    cfg = SampleConfig(max_new_tokens=new, temperature=0.0)
    precision = choose_precision(torch.device("cpu"), dtype)
    start = time.perf_counter()
    ids = list(generate_ids(model, PROMPT, cfg, precision=precision))
    return len(ids) / (time.perf_counter() - start), ids


def theirs(hf: torch.nn.Module, new: int) -> tuple[float, list[int]]:
    prompt = torch.tensor([PROMPT])
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(prompt, max_new_tokens=new, do_sample=False, use_cache=True,  # type: ignore[operator]
                          pad_token_id=0, eos_token_id=None)  # fmt: skip
    ids = out[0, len(PROMPT) :].tolist()
    return len(ids) / (time.perf_counter() - start), ids


def read_rate(seconds: float = 2.0) -> float:
    """Bytes per second this machine reads from memory (a sum over a tensor far larger than its caches)."""
    big = torch.ones(128 * 2**20)  # 512 MiB of fp32
    big.sum()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        big.sum()
        count += 1
    return count * big.numel() * 4 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="shakespeare")
    parser.add_argument("--new", type=int, default=None, help="characters (default: one window's room)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model_cfg, _ = config.resolve(args.preset, overrides={"vocab_size": 65, "dropout": 0.0})
    new = args.new or model_cfg.block_size - len(PROMPT)
    torch.manual_seed(0)
    model = speed_up(GPT(model_cfg)).eval()
    assert isinstance(model, FastGPT)
    default = choose_decode_weights(model, "auto")  # what chat, sample and serve pick for this model
    hf = hf_twin(model)
    _, mine = ours(model, new, "fp32")
    _, their_ids = theirs(hf, new)
    same = mine == their_ids
    paths = {
        "transformers generate, fp32": lambda: theirs(hf, new)[0],
        "minigpt2 engine, fp32": lambda: ours(model, new, "fp32")[0],
        "minigpt2 engine, bf16 autocast": lambda: ours(model, new, "bf16")[0],
        "minigpt2 engine, int8 weights": lambda: ours(model, new, "fp32", "int8")[0],
    }
    speeds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, run in paths.items():
            speeds[name].append(run())
    reference = statistics.median(speeds["transformers generate, fp32"])
    rows = [{"path": name, "chars_per_s": statistics.median(v), "ratio": statistics.median(v) / reference,
             "rounds": " ".join(f"{x:.0f}" for x in v)} for name, v in speeds.items()]  # fmt: skip
    rate = read_rate()
    weight_bytes = 4 * sum(p.numel() for p in model.parameters())  # the tied head is read once more
    ceiling = rate / weight_bytes
    print(
        f"preset {args.preset}: {model.num_params():,} parameters, {new} new characters; same ids: {same};"
        f" {cpu_model()}; decode weights by default: {default.name} ({default.reason})"
    )
    print_table(rows, ["path", "chars_per_s", "ratio", "rounds"])
    print(f"memory read {rate / 1e9:.1f} GB/s; fp32 weights {weight_bytes / 2**20:.1f} MiB: at most"
          f" {ceiling:,.0f} characters/s in fp32, {2 * ceiling:,.0f} with 2-byte weights, {4 * ceiling:,.0f}"
          f" with 1-byte weights")  # fmt: skip
    emit({"preset": args.preset, "new": new, "same_ids": same, "transformers_chars_per_s": reference,
          "read_gb_per_s": rate / 1e9, "fp32_ceiling_chars_per_s": ceiling,
          **{r["path"]: r["chars_per_s"] for r in rows}})  # fmt: skip


if __name__ == "__main__":
    main()
