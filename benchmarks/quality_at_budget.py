"""Quality for the time: the best val loss ``train --max-minutes M`` reaches without a preset.

    python benchmarks/quality_at_budget.py --minutes 5
    python benchmarks/quality_at_budget.py --minutes 5 --with-reference   # + the usual small recipe
    python benchmarks/quality_at_budget.py --minutes 5 --preset cpu       # the cpu preset as it is

Without ``--preset`` it trains what ``minigpt2 train --max-minutes M`` trains: the ``cpu`` preset
with its width fitted to this machine and the budget (``training/fit.py``); ``--preset NAME``
trains that preset as it is.

Trains on the first 1,115,394 characters of the ``shakespeare`` source (the classic size) with the
real training loop (``--max-minutes``: the LR schedule decays over the steps that fit the budget).
``--with-reference`` also trains the usual small CPU recipe (4 layers x 128 wide, context 64,
batch 12, fp32) for the same time, in the same script. Writes val loss against wall time to
``--plot`` (default docs/val_loss_vs_time.png).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_model, emit, print_table, shakespeare_prefix_data

from minigpt2.hardware.precision import choose_device
from minigpt2.storage.fileio import atomic_write_bytes
from minigpt2.training.metrics import png_bytes, read_metrics
from minigpt2.training.run_configs import configs_for_training
from minigpt2.training.trainer import train

# The usual small CPU recipe, as is: AdamW (the `cpu` preset it starts from uses Muon).
REFERENCE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dtype="fp32", dropout=0.0,
                 engine="reference", attn_impl="manual", lr=1e-3, min_lr=1e-4, eval_interval=250,
                 optimizer="adamw")  # fmt: skip


def run(name: str, preset: str | None, minutes: float, overrides: dict[str, Any]) -> dict[str, Any]:
    # The budget ends every run: a preset as it is gets room for any number of steps; a fitted one
    # keeps its preset's max_iters, which the fit measures against and then raises itself.
    steps = {} if preset is None else {"max_iters": 1_000_000}
    settings = dict(overrides, max_minutes=minutes, **steps, early_stopping=False)
    model_cfg, train_cfg = configs_for_training(preset, {}, settings)  # as `minigpt2 train` resolves
    data_dir = shakespeare_prefix_data(model_cfg.block_size)
    with tempfile.TemporaryDirectory() as tmp:
        result = train(data_dir, Path(tmp) / "run", model_cfg, train_cfg)
        rows = read_metrics(Path(tmp) / "run" / "metrics.csv")
        width = json.loads((Path(tmp) / "run" / "config.json").read_text())["model"]["n_embd"]
    curve = [(r["elapsed_s"], r["val_loss"]) for r in rows if r["val_loss"] == r["val_loss"]]
    return {"name": name, "width": width, "best_val_loss": result.best_val_loss, "steps": result.steps,
            "device": choose_device(train_cfg.device).type,
            "tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows), "curve": curve,
            "precision": result.precision}  # fmt: skip


def seconds_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """Training seconds until val loss first reached ``target`` (None: never)."""
    return next((t for t, v in curve if v <= target), None)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for r in results:
        ax.plot([t / 60 for t, _ in r["curve"]], [v for _, v in r["curve"]], "o-", ms=3, label=r["name"])
    ax.set_xlabel("wall time (minutes)")
    ax.set_ylabel("val loss (nats/char)")
    where = "one GPU" if results[0]["device"].startswith("cuda") else f"{os.cpu_count()}-core CPU"
    ax.set_title(f"Shakespeare (1,115,394 chars), {where}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write_bytes(path, png_bytes(fig))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--preset", default=None, help="a preset as it is (default: cpu, width fitted)")
    parser.add_argument("--with-reference", action="store_true")
    parser.add_argument("--plot", default=str(Path(__file__).parents[1] / "docs" / "val_loss_vs_time.png"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override preset fields")
    parser.add_argument("--target", type=float, default=None, help="also report when val loss reached this")
    args = parser.parse_args()
    # The trainer's messages (precision, "torch.compile: on" or why it fell back) on stderr.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {k: _parse(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    # The label names the settings that change training; compile and evaluation settings do not.
    changed = [
        f"{k}={v}" for k, v in overrides.items() if k not in ("compile", "eval_interval", "eval_iters")
    ]
    label = (f"{args.preset} preset" if args.preset else "cpu preset, width fitted") + (
        f" + {', '.join(changed)}" if changed else " (default path)"
    )
    results = [run(label, args.preset, args.minutes, overrides)]
    if args.with_reference:
        results.append(run("reference: 4x128, ctx 64, batch 12, fp32", "cpu", args.minutes, REFERENCE))
    for r in results:
        r["seconds_to_target"] = seconds_to(r["curve"], args.target) if args.target else None
    print_table(results, ["name", "device", "precision", "width", "steps", "tokens_per_s", "best_val_loss",
                          "seconds_to_target"])  # fmt: skip
    if args.plot:
        plot(results, Path(args.plot))
    figures: dict[str, Any] = {"minutes": args.minutes, "preset": args.preset, "overrides": overrides}
    figures.update(best_val_loss=results[0]["best_val_loss"], steps=results[0]["steps"],
                   tokens_per_s=results[0]["tokens_per_s"], device=results[0]["device"],
                   width=results[0]["width"], cpu=cpu_model())  # fmt: skip
    if args.target:
        figures.update(target=args.target, seconds_to_target=results[0]["seconds_to_target"])
    if args.with_reference:
        figures["reference_best_val_loss"] = results[1]["best_val_loss"]
    emit(figures)


def _parse(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


if __name__ == "__main__":
    main()
