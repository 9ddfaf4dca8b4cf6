"""Load on ``minigpt2 serve``: N concurrent streaming clients against one client alone, same script.

    python benchmarks/serve_load.py                 # cpu preset (random weights), 20 clients, 10 s
    python benchmarks/serve_load.py --clients 50 --seconds 20 --max-concurrent 4

A real uvicorn server on loopback, in its own process; each client streams answers of ``--tokens``
characters in a loop (the official ``openai`` client) until the time is up. The reference is one
client alone in the same script. Reports characters/s served, time to first character (median and
95th percentile), requests refused (429) and failed, and whether every answer arrived whole.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, print_table

from minigpt2 import serve
from minigpt2.core import config
from minigpt2.core.chat import Chatbot, DialogueTemplate
from minigpt2.core.config import SampleConfig
from minigpt2.core.model import GPT
from minigpt2.core.tokenizer import CharTokenizer

VOCAB = sorted(set("\n !',-.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))


def client_loop(base: str, tokens: int, until: float, seed: int) -> dict[str, Any]:
    """Stream answers back to back until ``until``; returns counts and first-character latencies."""
    api = openai.OpenAI(base_url=base + "v1", api_key="x", max_retries=0, timeout=120)
    out: dict[str, Any] = {"chars": 0, "answers": 0, "whole": 0, "refused": 0, "failed": 0, "ttfc": []}
    while time.monotonic() < until:
        start = time.monotonic()
        try:
            stream = api.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"tell me a story {seed}"}],
                max_tokens=tokens, stream=True, seed=seed, temperature=1.0,
            )  # fmt: skip
            text, finish = "", None
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    if not text:
                        out["ttfc"].append(time.monotonic() - start)
                    text += chunk.choices[0].delta.content
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            out["answers"] += 1
            out["chars"] += len(text)
            out["whole"] += finish is not None
        except openai.RateLimitError:
            out["refused"] += 1
            time.sleep(0.5)
        except openai.APIError:
            out["failed"] += 1
    return out


@contextlib.contextmanager
def server(args: argparse.Namespace) -> Iterator[str]:
    """This script with ``--serve``, in its own process: clients must not share its interpreter."""
    cmd = [sys.executable, __file__, "--serve", "--preset", args.preset, "--tokens", str(args.tokens),
           "--max-concurrent", str(args.max_concurrent), "--max-queue", str(args.max_queue)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def serve_forever(args: argparse.Namespace) -> None:
    """The server side: random weights, and no stop tokens (random weights would end most answers
    after a few characters; a load test wants full-length answers). Prints its address."""
    tok = CharTokenizer(VOCAB)
    model_cfg, _ = config.resolve(args.preset, overrides={"vocab_size": tok.vocab_size})
    torch.manual_seed(0)
    sample = SampleConfig(max_new_tokens=args.tokens)
    bot = Chatbot(GPT(model_cfg).eval(), tok, DialogueTemplate(stop_ids=()), sample=sample)
    if args.max_concurrent > 1:  # as `minigpt2 serve` does
        torch.set_num_threads(max(1, torch.get_num_threads() // args.max_concurrent))
    limits = serve.ServeConfig(max_concurrent=args.max_concurrent, max_queue=args.max_queue)
    with contextlib.suppress(KeyboardInterrupt):
        serve.run_server(
            serve.create_app(bot, limits), "127.0.0.1", 0, on_ready=lambda url: print(url, flush=True)
        )


def measure(base: str, clients: int, seconds: float, tokens: int) -> dict[str, Any]:
    client_loop(base, 5, time.monotonic() + 0.5, 0)  # warm up
    until = time.monotonic() + seconds
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: client_loop(base, tokens, until, i), range(clients)))
    took = time.monotonic() - start
    ttfc = sorted(t for r in results for t in r["ttfc"])
    total = {k: sum(r[k] for r in results) for k in ("chars", "answers", "whole", "refused", "failed")}
    return {
        "clients": clients, **total, "chars_per_s": total["chars"] / took,
        "ttfc_median_ms": 1000 * statistics.median(ttfc) if ttfc else None,
        "ttfc_p95_ms": 1000 * ttfc[int(0.95 * (len(ttfc) - 1))] if ttfc else None,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--tokens", type=int, default=100, help="characters per answer")
    parser.add_argument("--max-concurrent", type=int, default=2)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # internal: the server
    args = parser.parse_args()
    if args.serve:
        serve_forever(args)
        return
    with server(args) as base:
        rows = [measure(base, 1, args.seconds, args.tokens)]
        rows.append(measure(base, args.clients, args.seconds, args.tokens))
    for r in rows:
        r["vs_one_client"] = r["chars_per_s"] / rows[0]["chars_per_s"]
    print(f"preset {args.preset}, {args.tokens} characters per answer, max_concurrent {args.max_concurrent},"
          f" max_queue {args.max_queue}; the server runs in its own process")  # fmt: skip
    print_table(rows, ["clients", "answers", "whole", "refused", "failed", "chars_per_s", "vs_one_client",
                       "ttfc_median_ms", "ttfc_p95_ms"])  # fmt: skip
    load = rows[1]
    emit({"clients": args.clients, "chars_per_s": load["chars_per_s"], "ratio": load["vs_one_client"],
          "answers": load["answers"], "whole": load["whole"], "refused": load["refused"],
          "failed": load["failed"], "ttfc_p95_ms": load["ttfc_p95_ms"]})  # fmt: skip


if __name__ == "__main__":
    main()
