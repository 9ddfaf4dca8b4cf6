"""Load on ``minigpt2 serve``: 1, 5, 20 and 50 streaming clients, then 100 at once against the queue.

    python benchmarks/serve_load.py                    # cpu preset (random weights), 3 x 10 s a client count
    python benchmarks/serve_load.py --max-concurrent 8 --clients 1,20,50 --seconds 20

A real uvicorn server on loopback, in its own process, generating through the batched engine: its
``--max-concurrent`` rows advance together, one character each per model step. Each client streams
answers of ``--tokens`` characters in a loop (the official ``openai`` client) until the time is up;
the reference is one client alone, against the same server. The client counts take turns for
``--rounds`` rounds; each is reported by its median round: characters/s served (all clients
together), time to first character (median and 95th percentile), chunks per answer (the role and
the finish are one each), answers refused (429) and failed, whether every answer arrived whole,
and the CPU cores the server used (on a small machine the clients take the rest). The server
decodes with ``--decode-weights`` and streams with ``--stream-interval``, as ``minigpt2 serve``
does. Then the ceiling batching allows on this machine: the batched model step alone (no server,
no clients), one row against as many rows as the largest client count that fits the batch. Then
the burst (``--burst 0``: none): ``--burst`` clients each send one request at the same moment to a
server whose queue holds ``--burst-queue``; every answer let in must arrive whole and the rest
must get 429; the server's peak RSS is reported.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import batch_stepper, cpu_model, emit, print_table, step_ms

from minigpt2 import serve
from minigpt2.core import config
from minigpt2.core.chat import Chatbot, DialogueTemplate
from minigpt2.core.config import SampleConfig
from minigpt2.core.model import GPT
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.fast import speed_up
from minigpt2.fast.int8 import DECODE_WEIGHTS, choose_decode_weights

VOCAB = sorted(set("\n !',-.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))


def stream_one(api: openai.OpenAI, tokens: int, seed: int) -> tuple[str, str | None, float | None, int]:
    """One streamed answer: its text, its finish reason, seconds to its first character, and the
    chunks it came in."""
    start, first = time.monotonic(), None
    text, finish, chunks = "", None, 0
    stream = api.chat.completions.create(
        model="m", messages=[{"role": "user", "content": f"tell me a story {seed}"}],
        max_tokens=tokens, stream=True, seed=seed, temperature=1.0,
    )  # fmt: skip
    for chunk in stream:
        chunks += 1
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.monotonic() - start
            text += chunk.choices[0].delta.content
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    return text, finish, first, chunks


def client_loop(base: str, tokens: int, until: float, seed: int) -> dict[str, Any]:
    """Stream answers back to back until ``until``; returns counts and first-character latencies."""
    api = openai.OpenAI(base_url=base + "v1", api_key="x", max_retries=0, timeout=300)
    out: dict[str, Any] = {"chars": 0, "answers": 0, "whole": 0, "refused": 0, "failed": 0, "chunks": 0,
                           "ttfc": []}  # fmt: skip
    while time.monotonic() < until:
        try:
            text, finish, first, chunks = stream_one(api, tokens, seed)
        except openai.RateLimitError:
            out["refused"] += 1
            time.sleep(0.5)
            continue
        except openai.APIError:
            out["failed"] += 1
            continue
        out["answers"] += 1
        out["chars"] += len(text)
        out["chunks"] += chunks
        out["whole"] += finish == "length"  # no stop ids: a whole answer runs to max_tokens
        if first is not None:
            out["ttfc"].append(first)
    return out


@contextlib.contextmanager
def server(args: argparse.Namespace, max_queue: int) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """This script with ``--serve``, in its own process: clients must not share its interpreter."""
    cmd = [sys.executable, __file__, "--serve", "--preset", args.preset, "--tokens", str(args.tokens),
           "--max-concurrent", str(args.max_concurrent), "--max-queue", str(max_queue),
           "--decode-weights", args.decode_weights,
           "--stream-interval", str(args.stream_interval)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip(), proc
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def cpu_seconds(pid: int) -> float:
    """CPU time the process has used so far, all its threads together."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def served_model(args: argparse.Namespace) -> GPT:
    """The served model: random weights of ``--preset``, decoding with the weights ``minigpt2 serve
    --decode-weights`` would choose."""
    model_cfg, _ = config.resolve(args.preset, overrides={"vocab_size": CharTokenizer(VOCAB).vocab_size})
    torch.manual_seed(0)
    model = speed_up(GPT(model_cfg)).eval()
    weights = choose_decode_weights(model, args.decode_weights)  # as `minigpt2 serve` loads a run
    model.decode_weights = weights.name
    print(f"decode weights: {weights.name} ({weights.reason})", file=sys.stderr, flush=True)
    return model


def serve_forever(args: argparse.Namespace) -> None:
    """The server side: no stop ids (random weights would end most answers after a few
    characters; a load test wants full-length answers). Prints its address."""
    model = served_model(args)
    bot = Chatbot(model, CharTokenizer(VOCAB), DialogueTemplate(stop_ids=()),
                  sample=SampleConfig(max_new_tokens=args.tokens))  # fmt: skip
    limits = serve.ServeConfig(max_concurrent=args.max_concurrent, max_queue=args.max_queue,
                               stream_interval=args.stream_interval)  # fmt: skip
    with contextlib.suppress(KeyboardInterrupt):
        serve.run_server(
            serve.create_app(bot, limits), "127.0.0.1", 0, on_ready=lambda url: print(url, flush=True)
        )


def model_bound(args: argparse.Namespace, rows: int) -> dict[str, float]:
    """The most batching can give with no server at all: the batched model step (``BatchStep``, the
    forward pass only) for one row and for ``rows`` rows of mixed lengths, in turns; ``ratio`` is
    ``rows`` rows' characters/s over one row's, the ceiling of the served ``vs_one_client``."""
    model = served_model(args)
    one, many = (
        batch_stepper(model, model.decode_weights, 1),
        batch_stepper(model, model.decode_weights, rows),
    )
    times: dict[int, list[float]] = {1: [], rows: []}
    for _ in range(5):
        times[1].append(step_ms(one, 50))
        times[rows].append(step_ms(many, 50))
    t1, tn = statistics.median(times[1]), statistics.median(times[rows])
    return {"rows": rows, "one_row_ms": t1, "rows_ms": tn, "ratio": rows * t1 / tn}


def measure(base: str, pid: int, clients: int, seconds: float, tokens: int) -> dict[str, Any]:
    until = time.monotonic() + seconds
    start, cpu = time.monotonic(), cpu_seconds(pid)
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: client_loop(base, tokens, until, i), range(clients)))
    took = time.monotonic() - start
    ttfc = sorted(t for r in results for t in r["ttfc"])
    total = {
        k: sum(r[k] for r in results) for k in ("chars", "answers", "whole", "refused", "failed", "chunks")
    }
    return {
        "clients": clients, **total, "chars_per_s": total["chars"] / took,
        "chunks_per_answer": total["chunks"] / max(1, total["answers"]),
        "ttfc_median_ms": 1000 * statistics.median(ttfc) if ttfc else None,
        "ttfc_p95_ms": 1000 * ttfc[int(0.95 * (len(ttfc) - 1))] if ttfc else None,
        "server_cores": (cpu_seconds(pid) - cpu) / took,
    }  # fmt: skip


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median characters/s (the upper one of an even count), with every
    round's characters/s under "rounds"."""
    ordered = sorted(runs, key=lambda r: r["chars_per_s"])
    return {**ordered[len(ordered) // 2], "rounds": " ".join(f"{r['chars_per_s']:.0f}" for r in runs)}


def burst(base: str, clients: int, tokens: int) -> dict[str, int]:
    """``clients`` requests sent at the same moment, one each; how each one ended."""
    gate = threading.Barrier(clients)

    def one(seed: int) -> str:
        api = openai.OpenAI(base_url=base + "v1", api_key="x", max_retries=0, timeout=600)
        gate.wait()
        try:
            _, finish, _, _ = stream_one(api, tokens, seed)
        except openai.RateLimitError:
            return "refused"
        except openai.APIError:
            return "failed"
        return "whole" if finish == "length" else "cut"

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        ends = list(pool.map(one, range(clients)))
    return {end: ends.count(end) for end in ("whole", "cut", "refused", "failed")}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--clients", default="1,5,20,50", help="client counts, the first the reference")
    parser.add_argument("--seconds", type=float, default=10.0, help="per client count and round")
    parser.add_argument("--rounds", type=int, default=3, help="turns of all client counts (medians)")
    parser.add_argument("--tokens", type=int, default=100, help="characters per answer")
    parser.add_argument("--max-concurrent", type=int, default=serve.ServeConfig.max_concurrent)
    parser.add_argument("--max-queue", type=int, default=64, help="for the client counts: no 429 at 50")
    parser.add_argument("--burst", type=int, default=100, help="clients sending one request at once")
    parser.add_argument("--burst-queue", type=int, default=32, help="the queue the burst meets")
    parser.add_argument("--decode-weights", default="auto", choices=DECODE_WEIGHTS,
                        help="the server's, as `minigpt2 serve --decode-weights` (default auto)")  # fmt: skip
    parser.add_argument("--stream-interval", type=float, default=serve.ServeConfig.stream_interval,
                        help="the server's, as `minigpt2 serve --stream-interval`")  # fmt: skip
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # internal: the server
    args = parser.parse_args()
    if args.serve:
        serve_forever(args)
        return
    counts = [int(c) for c in args.clients.split(",")]
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    with server(args, args.max_queue) as (base, proc):
        client_loop(base, 5, time.monotonic() + 1.0, 0)  # warm up
        for _ in range(args.rounds):  # the client counts take turns, so a slow minute hits them all
            for n in counts:
                runs[n].append(measure(base, proc.pid, n, args.seconds, args.tokens))
    rows = [median_run(runs[n]) for n in counts]
    bound = model_bound(args, max((n for n in counts if n <= args.max_concurrent), default=1))
    for r in rows:
        r["vs_one_client"] = r["chars_per_s"] / rows[0]["chars_per_s"]
    ends, rss = {"whole": 0, "cut": 0, "refused": 0, "failed": 0}, 0.0
    if args.burst:  # --burst 0: the client counts only
        with server(args, args.burst_queue) as (base, proc):
            client_loop(base, 5, time.monotonic() + 1.0, 0)
            ends = burst(base, args.burst, args.tokens)
            rss = peak_rss_mib(proc.pid)
    print(f"{cpu_model()}, {torch.get_num_threads()} torch threads; {datetime.date.today()}; preset "
          f"{args.preset}, {args.tokens} characters per answer, --max-concurrent {args.max_concurrent} "
          f"(rows of the batch), --max-queue {args.max_queue}; the server in its own process")  # fmt: skip
    columns = ["clients", "answers", "whole", "refused", "failed", "chars_per_s", "vs_one_client",
               "ttfc_median_ms", "ttfc_p95_ms", "chunks_per_answer", "server_cores", "rounds"]  # fmt: skip
    print_table(rows, columns)
    print(
        f"\nthe model alone (the batched step, no server): {bound['rows']} rows {bound['rows_ms']:.2f} ms a "
        f"step, 1 row {bound['one_row_ms']:.2f} ms: at most {bound['ratio']:.2f}x one row's characters/s"
    )
    if args.burst:
        print(f"\n{args.burst} clients at once against --max-queue {args.burst_queue}: {ends['whole']} "
              f"answers whole, {ends['cut']} cut short, {ends['refused']} refused (429), {ends['failed']} "
              f"failed; server peak RSS {rss:.0f} MiB")  # fmt: skip
    keys = ("chars_per_s", "vs_one_client", "ttfc_median_ms", "ttfc_p95_ms", "whole", "answers", "refused",
            "failed", "chunks_per_answer", "server_cores")  # fmt: skip
    bursts = {"clients": args.burst, "max_queue": args.burst_queue, **ends, "peak_rss_mib": rss}
    emit({"max_concurrent": args.max_concurrent, "tokens": args.tokens, "model_alone": bound,
          "clients": {r["clients"]: {k: r[k] for k in keys} for r in rows}, "burst": bursts})  # fmt: skip


if __name__ == "__main__":
    main()
