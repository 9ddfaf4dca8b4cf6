"""What int8 decoding weights cost in quality, and what they buy in speed, on a trained run.

    python benchmarks/decode_weights.py --run runs/chat-chatterbot-english \\
        --data data/chatterbot-english+shakespeare

(the run and data folders ``make chat`` leaves). For each way of decoding, the script feeds the
first ``--chars`` characters of the validation split one character at a time through the decode
step (``fast/decode.Decoder``, the step chat and serve use), in windows of the model's context,
and counts the loss of every next character; so the loss is of the numbers generation reads.
The ways: the weights as trained (fp32), the same under bf16 autocast, and int8 weights
(``fast/int8.py``). It reports each one's loss, its difference from fp32, how often its likeliest
next character is fp32's, and its characters/s over the same steps (a ratio to fp32).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_model, emit, print_table

from minigpt2.core.model import GPT, KVCache
from minigpt2.fast import speed_up
from minigpt2.fast.decode import Decoder
from minigpt2.storage import checkpoint


@torch.inference_mode()
def step_logits(model: GPT, decoder: Decoder, tokens: torch.Tensor, autocast: bool) -> torch.Tensor:
    """Logits (N - windows, V) for every character of ``tokens`` (N,) but each window's first,
    fed one at a time: the window's first character through the model, the rest through ``decoder``."""
    block, out = model.config.block_size, []
    region = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with region:
        for start in range(0, tokens.numel() - 1, block):
            window = tokens[start : start + block + 1]
            cache = KVCache(model.config)
            logits, _ = model(window[None, :1], cache=cache)  # (1, 1, V)
            out.append(logits[0, -1].float())
            for t in range(1, window.numel() - 1):
                out.append(decoder.step(int(window[t]), cache).float())
    return torch.stack(out)  # (N', V): the prediction of the character after each one fed


def targets_of(tokens: torch.Tensor, block: int) -> torch.Tensor:
    """The next character of every position ``step_logits`` predicts from."""
    return torch.cat([tokens[s + 1 : s + block + 1] for s in range(0, tokens.numel() - 1, block)])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="a trained run folder (its best checkpoint)")
    parser.add_argument("--data", required=True, help="the data folder it was trained on (val.bin)")
    parser.add_argument("--chars", type=int, default=20_000, help="validation characters to score")
    args = parser.parse_args()
    model, _, _ = checkpoint.load_model(Path(args.run), "cpu")
    model = speed_up(model).eval()
    val = np.fromfile(Path(args.data) / "val.bin", dtype=np.uint16)[: args.chars + 1]
    tokens = torch.from_numpy(val.astype(np.int64))
    targets = targets_of(tokens, model.config.block_size)
    ways = {"fp32 (as trained)": ("fp32", False), "fp32 weights, bf16 autocast": ("fp32", True),
            "int8 weights": ("int8", False)}  # fmt: skip
    results = {}
    for name, (weights, autocast) in ways.items():
        decoder = Decoder(model, weights)
        start = time.perf_counter()
        logits = step_logits(model, decoder, tokens, autocast)
        seconds = time.perf_counter() - start
        results[name] = (logits, F.cross_entropy(logits, targets).item(), targets.numel() / seconds)
    ref_logits, ref_loss, ref_speed = results["fp32 (as trained)"]
    # Five decimals: the differences this script is for are in the fourth and fifth.
    rows = [{"decoding": name, "loss": f"{loss:.5f}", "vs_fp32": f"{loss - ref_loss:+.5f}",
             "loss_value": loss,
             "same_top1": (logits.argmax(1) == ref_logits.argmax(1)).float().mean().item(),
             "chars_per_s": speed, "speed_ratio": speed / ref_speed}
            for name, (logits, loss, speed) in results.items()]  # fmt: skip
    scored = targets.numel()
    print(f"{args.run}: {model.num_params():,} parameters, {scored:,} characters scored; {cpu_model()}")
    print_table(rows, ["decoding", "loss", "vs_fp32", "same_top1", "chars_per_s", "speed_ratio"])
    emit({"run": args.run, "chars": targets.numel(), **{r["decoding"]: r["loss_value"] for r in rows},
          "int8_same_top1": rows[-1]["same_top1"], "int8_speed_ratio": rows[-1]["speed_ratio"]})  # fmt: skip


if __name__ == "__main__":
    main()
