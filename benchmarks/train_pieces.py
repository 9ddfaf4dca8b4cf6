"""The engine's CPU training drop-ins one at a time: each against its textbook piece, same process.

    python benchmarks/train_pieces.py --preset cpu
    python benchmarks/train_pieces.py --preset chat --dtype bf16

Times forward + backward of one block's attention and MLP at the preset's shape (its batch in one
pass, or ``--batch-size``), in the precision ``--dtype`` resolves to, with the engine's freed memory
kept for reuse. The variants take turns for ``--rounds`` rounds (medians; the machine's speed drifts
from minute to minute). Attention: the textbook's written-out attention, its SDPA, and the drop-in
(``CausalAttention``, also with ``--dropout``). MLP: the textbook's (``F.gelu``), with the compiled
GELU, and ``CompiledGELUMLP`` (the bias in the GELU's loop). Each row's ratio is
against the first of its piece; the block's share of a whole step is in ``train_throughput.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_model, emit, print_table

from minigpt2.core import config
from minigpt2.core.model import MLP, CausalSelfAttention
from minigpt2.core.precision import Precision
from minigpt2.fast import speed_up
from minigpt2.fast.attention import CPUTrainingAttention
from minigpt2.fast.gelu import CompiledGELU, CompiledGELUMLP
from minigpt2.fast.memory import keep_freed_memory
from minigpt2.hardware.precision import choose_precision

Variant = Callable[[Tensor], Tensor]


def variants(model_cfg: config.ModelConfig, dropout: float) -> dict[str, dict[str, Variant]]:
    """{piece: {variant name: module call}}, the textbook's first, all with the same weights."""
    torch.manual_seed(0)
    cfg = config.ModelConfig(**{**model_cfg.__dict__, "dropout": dropout, "attn_impl": "manual"})
    manual = CausalSelfAttention(cfg).train()
    sdpa = CausalSelfAttention(config.ModelConfig(**{**cfg.__dict__, "attn_impl": "sdpa"})).train()
    tuned = speed_up_module(CausalSelfAttention(cfg), manual)
    plain_mlp = MLP(cfg).train()
    fast_mlp = speed_up_module(MLP(cfg), plain_mlp)
    assert type(tuned) is CPUTrainingAttention and type(fast_mlp) is CompiledGELUMLP
    assert isinstance(fast_mlp.act, CompiledGELU)
    sdpa.load_state_dict(manual.state_dict())
    return {
        "attention": {
            "textbook (written out)": manual,
            "textbook (SDPA)": sdpa,
            "drop-in": tuned,
        },
        "mlp": {
            "textbook (F.gelu)": plain_mlp,
            "compiled GELU": lambda x: MLP.forward(fast_mlp, x),
            "drop-in (bias in the GELU's loop)": fast_mlp,
        },
    }


def speed_up_module(module: nn.Module, twin: nn.Module) -> nn.Module:
    """``module`` with ``twin``'s weights and the engine's classes (``speed_up`` walks any module)."""
    module.load_state_dict(twin.state_dict())
    return speed_up(module).train()  # type: ignore[arg-type]


def time_rounds(
    calls: dict[str, Variant], x: Tensor, precision: Precision, rounds: int, repeat: int
) -> dict[str, list[float]]:
    """Seconds per forward + backward of each call, one median of ``repeat`` per round, in turns."""
    grad = torch.randn_like(x)

    def once(call: Variant) -> None:
        with precision.autocast():
            y = call(x)
        y.float().backward(grad)
        x.grad = None  # the next call writes a fresh gradient rather than adding into this one

    for call in calls.values():  # warm-up: the compiled GELU compiles here
        for _ in range(2):
            once(call)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds):
        for name in list(calls) if r % 2 == 0 else list(calls)[::-1]:
            runs = []
            for _ in range(repeat):
                start = time.perf_counter()
                once(calls[name])
                runs.append(time.perf_counter() - start)
            times[name].append(statistics.median(runs))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--batch-size", type=int, default=0, help="default: the preset's")
    parser.add_argument("--dtype", default="auto", help="auto, fp32 or bf16 (autocast)")
    parser.add_argument("--dropout", type=float, default=0.0, help="the attention's and MLP's")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=3, help="calls per round and variant")
    args = parser.parse_args()
    model_cfg, train_cfg = config.resolve(args.preset)
    batch = args.batch_size or train_cfg.batch_size
    x = torch.randn(batch, model_cfg.block_size, model_cfg.n_embd, requires_grad=True)
    tokens, width = batch * model_cfg.block_size, model_cfg.n_embd
    precision = choose_precision(
        torch.device("cpu"), args.dtype, work=tokens * width**2, shape=(tokens, width)
    )
    dtype = precision.name
    rows = []
    with keep_freed_memory():
        for piece, calls in variants(model_cfg, args.dropout).items():
            times = time_rounds(calls, x, precision, args.rounds, args.repeat)
            first = statistics.median(next(iter(times.values())))
            for name, found in times.items():
                ms = statistics.median(found) * 1e3
                rows.append({"piece": piece, "variant": name, "ms": ms, "speedup": first * 1e3 / ms,
                             "rounds_ms": " ".join(f"{t * 1e3:.1f}" for t in found)})  # fmt: skip
    print(f"preset {args.preset}, batch {batch} x {model_cfg.block_size} x {width}, {dtype},"
          f" dropout {args.dropout:g}, forward + backward of one block's pieces; {cpu_model()}")  # fmt: skip
    print_table(rows, ["piece", "variant", "ms", "speedup", "rounds_ms"])
    emit({"preset": args.preset, "dtype": dtype, "dropout": args.dropout, "cpu": cpu_model(),
          "rows": [{k: r[k] for k in ("piece", "variant", "ms", "speedup")} for r in rows]})  # fmt: skip


if __name__ == "__main__":
    main()
