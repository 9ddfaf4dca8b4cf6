"""The ``minigpt2`` command: the only module that reads argv/stdin or prints.

Each subcommand parses its options and calls one library function. Bad input raises ``UserError``
somewhere below; here it becomes one line on stderr and exit status 2, without a traceback.
torch is imported only inside subcommands, so ``minigpt2 --help`` starts instantly.
Tests: ``pytest tests/test_cli.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from minigpt2.errors import UserError

Handler = Callable[[argparse.Namespace], int]


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _slug(source: str) -> str:
    name = Path(source).stem if Path(source).exists() else source.replace(":", "-")
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "corpus"


def cmd_prepare(args: argparse.Namespace) -> int:
    from minigpt2 import data

    out = Path(args.out) if args.out else Path("data") / _slug(args.source)
    meta = data.prepare(args.source, out, val_fraction=args.val_fraction, block_size=args.block_size)
    vocab = meta["tokenizer"]["chars"]
    print(
        f"prepared {args.source} -> {out}: {meta['train_tokens']:,} train and"
        f" {meta['val_tokens']:,} val tokens, {len(vocab)} distinct characters ({meta['kind']})"
    )
    return 0


def warn_unknown(tokenizer: Any, text: str) -> None:
    """Tell the user, once per call, which characters the model has never seen."""
    unknown = tokenizer.unknown_chars(text)
    if unknown:
        shown = " ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        _err(f"warning: the model never saw {len(unknown)} of these characters; they become <|unk|>: {shown}")


def _load_for_inference(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    from minigpt2 import checkpoint
    from minigpt2.precision import choose_device, choose_precision

    device = choose_device(args.device)
    precision = choose_precision(device, args.dtype)
    model, tokenizer, ckpt = checkpoint.load_model(Path(args.run), device)
    return model, tokenizer, ckpt, precision


def cmd_sample(args: argparse.Namespace) -> int:
    from minigpt2.config import SampleConfig
    from minigpt2.generate import stream_text

    cfg = SampleConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p,
                       repetition_penalty=args.repetition_penalty, seed=args.seed)  # fmt: skip
    model, tokenizer, _, precision = _load_for_inference(args)
    warn_unknown(tokenizer, args.prompt)
    sys.stdout.write(args.prompt)
    for piece in stream_text(model, tokenizer, args.prompt, cfg, precision=precision, stop_ids=()):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from minigpt2 import config
    from minigpt2.model import GPT

    print(f"{'preset':<12} {'layers':>6} {'heads':>5} {'width':>5} {'context':>7} {'params':>12}")
    for name in config.PRESETS:
        model_cfg, _ = config.resolve(name, overrides={"vocab_size": args.vocab_size})
        n = GPT(model_cfg).num_params()
        default = "  (default)" if name == config.DEFAULT_PRESET else ""
        print(f"{name:<12} {model_cfg.n_layer:>6} {model_cfg.n_head:>5} {model_cfg.n_embd:>5}"
              f" {model_cfg.block_size:>7} {n:>12,}{default}")  # fmt: skip
    return 0


def add_inference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast precision (default auto: bf16 where the hardware has it)")  # fmt: skip


def add_sampling_options(p: argparse.ArgumentParser, max_new_tokens: int = 500) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minigpt2",
        description="Train a character-level GPT-2 on your own text, then talk to it.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("prepare", help="turn a corpus into train.bin/val.bin/meta.json")
    p.add_argument("source", metavar="SOURCE",
                   help="a .txt file, a folder of .txt files, chatterbot[:LANG] or shakespeare")  # fmt: skip
    p.add_argument("--out", help="output folder (default data/<source>)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share held out (default 0.1)")
    p.add_argument("--block-size", type=int, default=128,
                   help="context window each split must hold (default 128)")  # fmt: skip
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("sample", help="continue a prompt with a trained model (streams)")
    p.add_argument("run", metavar="RUN", help="a run directory, or RUN/best or RUN/last")
    p.add_argument("--prompt", default="", help="text to continue (default: start fresh)")
    add_sampling_options(p)
    add_inference_options(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("presets", help="list the model presets and their parameter counts")
    p.add_argument("--vocab-size", type=int, default=100, help="vocabulary to count with")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except UserError as err:
        _err(f"error: {err}")
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:  # e.g. `minigpt2 sample ... | head`
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
