"""The handlers of the commands that make and measure models: prepare, train, eval, presets,
export, import-hf.

Each reads its parsed options, calls one library function and prints what it did; bad input
raises ``UserError`` below, which ``main`` reports. ``train`` exits 1 when the loss diverged, and
130 (SIGINT) or 143 (SIGTERM) when a signal stopped it, after its ``last/`` checkpoint is saved, so
that ``minigpt2 train ... && minigpt2 export ...`` goes no further. torch-using modules are
imported inside the handlers, so that ``minigpt2 --help`` imports none.
Tests: ``pytest tests/cli/test_cli.py tests/cli/test_train_cli.py tests/promises/test_hostile_input.py``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from minigpt2.cli.console import progress_bar


def cmd_prepare(args: argparse.Namespace) -> int:
    from minigpt2 import data
    from minigpt2.training.recipes import slug

    out = Path(args.out) if args.out else Path("data") / slug(args.source)
    meta = data.prepare(args.source, out, val_fraction=args.val_fraction, block_size=args.block_size,
                        force=args.force, mix=args.mix, mix_share=args.mix_share)  # fmt: skip
    vocab = meta["tokenizer"]["chars"]
    print(
        f"prepared {args.source} -> {out}: {meta['train_tokens']:,} train and"
        f" {meta['val_tokens']:,} val tokens, {len(vocab)} distinct characters ({meta['kind']})"
    )
    if meta["mix"]:
        mix = meta["mix"]
        copies = f"{args.source} {mix['source_repeats']:g}x, {mix['source']} {mix['mix_repeats']:g}x"
        print(f"mixed in {mix['source']}: {mix['tokens']:,} characters, {mix['share'] * 100:.4g}% of the"
              f" training split ({copies})")  # fmt: skip
    return 0


def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given explicitly on the command line (argparse defaults are None)."""
    from minigpt2.core.config import ModelConfig, TrainConfig, field_names

    names = field_names(ModelConfig) | field_names(TrainConfig)
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def cmd_train(args: argparse.Namespace) -> int:
    import logging

    from minigpt2.training.run_configs import configs_for_training, read_config_file
    from minigpt2.training.trainer import train

    logging.basicConfig(level=logging.WARNING)
    file_values = read_config_file(Path(args.config)) if args.config else {}
    init_from = Path(args.init_from) if args.init_from else None
    model_cfg, train_cfg = configs_for_training(
        args.preset, file_values, _train_overrides(args), Path(args.out) if args.resume else None, init_from
    )
    bar = progress_bar()
    try:
        result = train(Path(args.data), Path(args.out), model_cfg, train_cfg, resume=args.resume,
                       init_from=init_from, callbacks=[bar])  # fmt: skip
    finally:
        bar.on_end({})  # close the bar first, so that what follows starts on a line of its own
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    print(f"stopped: {result.stop_reason}")
    took = f"{result.steps} steps in {result.wall_time_s:.1f}s"
    if result.best_step < 0:  # no evaluation came before the end: there is no best/ to name
        print(f"no evaluation yet, so no best checkpoint; {took}")
    else:
        best = f"{result.best_val_loss:.4f} ({result.bits_per_char:.3f} bits/char)"
        print(f"best val loss {best} at step {result.best_step}; {took}")
    saved = [
        name for name in ("best/", "last/", "metrics.csv", "loss.png") if (result.run_dir / name).exists()
    ]
    print(
        f"run saved in {result.run_dir} ({', '.join(saved)})"
        if saved
        else f"nothing saved in {result.run_dir}"
    )
    if result.stop_signal is not None:  # as shells expect: 130 for Ctrl-C, 143 for SIGTERM
        return 128 + result.stop_signal
    return 1 if result.stop_reason.startswith("diverged") else 0


def cmd_eval(args: argparse.Namespace) -> int:
    import math

    from minigpt2 import data
    from minigpt2.errors import CheckpointError, ConfigError
    from minigpt2.inference.chatbot import load_for_inference
    from minigpt2.inference.evaluation import evaluate_tokens

    if args.batch_size < 1 or args.max_windows < 0:
        raise ConfigError(
            f"--batch-size must be >= 1 and --max-windows >= 0 (0 = all), got {args.batch_size}"
            f" and {args.max_windows}"
        )
    loaded = load_for_inference(args.run, args.device, args.dtype, args.engine, generation=False)
    dataset = data.load(Path(args.data))
    _, val = data.remap(dataset, loaded.tokenizer)
    loss = evaluate_tokens(loaded.model, val, args.batch_size, loaded.precision, max_windows=args.max_windows)
    if not math.isfinite(loss):  # finite weights can still overflow: no number to report
        raise CheckpointError(
            f"{loaded.ckpt.path}: the val loss is {loss}, not a number a model can have; its weights"
            " are damaged or its training diverged (evaluate another checkpoint, or train again)"
        )
    print(
        f"val loss {loss:.4f}  bits/char {loss / math.log(2):.4f}"
        f"  ({loaded.ckpt.path}, step {loaded.ckpt.meta.get('step')})"
    )
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from minigpt2.core import config
    from minigpt2.core.model import GPT

    print(f"{'preset':<12} {'layers':>6} {'heads':>5} {'width':>5} {'context':>7} {'params':>12}"
          f"  {'optimizer':<9}")  # fmt: skip
    for name in config.PRESETS:
        model_cfg, train_cfg = config.resolve(name, overrides={"vocab_size": args.vocab_size})
        n = GPT(model_cfg).num_params()
        default = "  (default)" if name == config.DEFAULT_PRESET else ""
        print(f"{name:<12} {model_cfg.n_layer:>6} {model_cfg.n_head:>5} {model_cfg.n_embd:>5}"
              f" {model_cfg.block_size:>7} {n:>12,}  {train_cfg.optimizer:<9}{default}")  # fmt: skip
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "web":
        from minigpt2.exports.web import export_web

        page = export_web(Path(args.run), Path(args.out), dtype=args.dtype, force=args.force)
        print(page.summary())
        return 0
    from minigpt2.exports.hf import export_hf

    out = export_hf(Path(args.run), Path(args.out), force=args.force)
    print(f"exported {args.run} as a Hugging Face GPT-2 model to {out}")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from minigpt2.exports.hf import import_hf

    run = import_hf(Path(args.dir), Path(args.out), force=args.force)
    print(f"imported {args.dir} into {run}/best")
    return 0
