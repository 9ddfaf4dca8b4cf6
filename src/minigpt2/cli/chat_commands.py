"""The handlers of the commands that talk with a trained model: sample, chat, quickstart, serve.

Each loads the model through ``minigpt2.inference`` (directly, or by ``Chatbot.from_run``) on the
engine ``--engine`` names; ``quickstart`` and a ``serve`` without a run train the default chatbot
first if there is none ready. The terminal chat loop itself is in ``repl.py``. torch-using modules
are imported inside the handlers, so that ``minigpt2 --help`` imports none.
Tests: ``pytest tests/cli/test_cli.py tests/core/test_chat.py tests/serve/test_serve_cli.py
tests/promises/test_hostile_input.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from minigpt2.cli import repl
from minigpt2.cli.console import err, progress_bar, warn_unknown, write_output
from minigpt2.errors import UserError


def sample_config(args: argparse.Namespace) -> Any:
    """The ``SampleConfig`` of the sampling options; validating it refuses a bad value early."""
    from minigpt2.core.config import SampleConfig

    return SampleConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, seed=args.seed)  # fmt: skip


def cmd_sample(args: argparse.Namespace) -> int:
    from minigpt2.core.stream import stream_text
    from minigpt2.inference.chatbot import load_for_inference

    cfg = sample_config(args)
    loaded = load_for_inference(args.run, args.device, args.dtype, args.engine, generation=True,
                                decode_weights=args.decode_weights)  # fmt: skip
    warn_unknown(loaded.tokenizer, args.prompt)
    write_output(args.prompt)
    pieces = stream_text(
        loaded.model, loaded.tokenizer, args.prompt, cfg, precision=loaded.precision, stop_ids=()
    )
    for piece in pieces:
        write_output(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _chatbot(args: argparse.Namespace, sample: Any) -> Any:
    from minigpt2.inference.chatbot import Chatbot

    return Chatbot.from_run(args.run, device=args.device, dtype=args.dtype, template=args.template,
                            engine=args.engine, decode_weights=args.decode_weights,
                            user_name=args.user_name, bot_name=args.bot_name,
                            sample=sample)  # fmt: skip


def cmd_chat(args: argparse.Namespace) -> int:
    bot = _chatbot(args, sample_config(args))
    if args.prompt is not None:
        repl.answer(bot, args.prompt, "")
        return 0
    return repl.converse(bot, args.run)


def cmd_quickstart(args: argparse.Namespace) -> int:
    args.run = _default_chatbot(args.source or f"chatterbot:{args.lang}", args.preset)
    return cmd_chat(args)


def _default_chatbot(source: str, preset: str | None = None) -> str:
    """The run directory of the default chatbot for ``source``, trained first if needed."""
    from minigpt2.training import recipes

    data_dir, run_dir = recipes.default_paths(source)
    if not recipes.is_ready(run_dir):
        mix = recipes.recipe_for(source).mix
        mixed = f" (with {mix} mixed in)" if mix else ""
        print(f"training the default chatbot on {source}{mixed} into {run_dir} (once; Ctrl-C stops early)")
    bar = progress_bar()
    try:
        return str(recipes.ensure_chatbot(source, data_dir, run_dir, preset=preset, callbacks=[bar]))
    finally:
        bar.on_end({})  # the bar's line ends before anything else is printed


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from minigpt2 import serve
    except ImportError as error:
        raise UserError(f"minigpt2 serve needs FastAPI and uvicorn ({error.name} is missing): "
                        "pip install 'minigpt2[serve]'") from None  # fmt: skip
    from urllib.parse import urlsplit

    from minigpt2.training.recipes import DEFAULT_SOURCE

    # Options are checked before anything is trained or loaded: the sampling ones, the key (which
    # every HTTP client must be able to send), the limits, the connection cap under the fd limit.
    sample = sample_config(args)
    api_key, key_name = args.api_key, "--api-key"
    if api_key is None:
        api_key, key_name = os.environ.get("MINIGPT2_API_KEY"), "MINIGPT2_API_KEY"
    if api_key is not None:
        serve.check_api_key(api_key, key_name)
    loopback = serve.is_loopback(args.host)
    limits = serve.ServeConfig(
        **{name: getattr(args, name) for name in (*serve.LIMITS, *serve.CONNECTION_LIMITS)},
        default_max_tokens=args.max_new_tokens, api_key=api_key, stream_interval=args.stream_interval,
        # On loopback, only loopback Host names: a web page elsewhere cannot rename itself to reach it.
        allowed_hosts=(serve.LOOPBACK,) if loopback else (),
    )  # fmt: skip
    limits.max_connections = serve.connection_cap(limits.max_connections)
    if args.max_new_tokens > limits.max_tokens:  # ServeConfig caps the default at the limit: say so
        above = f"--max-new-tokens {args.max_new_tokens} is above --max-tokens {limits.max_tokens}"
        err(f"note: {above}, the most one answer may ask for; answers default to {limits.max_tokens}")
    if args.run is None:  # the default chatbot, trained first if there is none (as `make chat` does)
        args.run = _default_chatbot(DEFAULT_SOURCE)
    limits.model_id = args.model_id or Path(args.run).resolve().name
    bot = _chatbot(args, sample)

    def ready(url: str) -> None:
        if not loopback and limits.api_key is None:
            err(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it")
        weights = getattr(bot.model, "decode_weights", "fp32")  # the fast engine's (--decode-weights)
        print(f"serving {args.run} as {limits.model_id!r}: web chat at {url}, OpenAI API at {url}v1"
              f"{' (API key required)' if limits.api_key else ''}; {weights} decoding weights; Ctrl-C stops",
              flush=True)  # fmt: skip
        others = serve.addresses(args.host, urlsplit(url).port or args.port)[1:]
        if others:  # listening on every interface: where other machines can find it
            print(f"also at {', '.join(others)} (this machine's other addresses)", flush=True)

    # uvicorn shuts down cleanly on Ctrl-C, then re-raises it; for a server it is the normal way out.
    with contextlib.suppress(KeyboardInterrupt):
        serve.run_server(serve.create_app(bot, limits), args.host, args.port, on_ready=ready)
    print("server stopped")
    return 0
