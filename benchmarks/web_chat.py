"""Chatting in the browser: the exported page (``minigpt2.exports.web``) in Chromium against the
Python chatbot.

    python benchmarks/web_chat.py                  # the `chat` preset's shape, random weights
    python benchmarks/web_chat.py --load-sizes     # also: each size's page, time to open, speed

Characters/s of whole chat answers (prompt, then up to ``--chars`` characters, sampled at the chat
defaults with a fixed seed), measured the same way on every path: the characters generated over the
time from the question to the end of the answer. The model has the `chat` preset's shape (4 layers,
4 heads, 256 wide, context 128) and random weights whose turn-ending ids are made impossible, so each
answer runs its full length (past the window, which slides, on every path alike). Paths: the
Python chatbot as ``minigpt2 chat`` runs it (``Chatbot.from_run``: the fast engine, fp32 on a CPU)
on one thread (the reference, as the page's worker has one) and on torch's threads, the textbook
model on one thread, then the page's Web Worker with fp32 and fp16 weights, in headless Chromium
(Debian's, /usr/bin/chromium). The paths take turns for ``--rounds`` rounds; each reports its median.

``--load-sizes`` exports bigger shapes too and reports each page's size, the time from opening it to
the model being ready, and the characters/s of a 50-character answer: what
``minigpt2.exports.web.export.MAX_PARAMS`` is chosen from.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from playwright.sync_api import Browser, Page, expect, sync_playwright

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, print_table

from minigpt2.core import config
from minigpt2.core.chat import DialogueTemplate, Turn
from minigpt2.core.config import SampleConfig
from minigpt2.core.model import GPT
from minigpt2.core.stream import ReplyInfo
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.exports.web import export as web_export
from minigpt2.exports.web import export_web
from minigpt2.inference.chatbot import Chatbot
from minigpt2.storage import checkpoint

CHROMIUM = "/usr/bin/chromium"
VOCAB = sorted(set("\n !\"',-.:;?()0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))
MESSAGE = "Hello! How are you today?"
# (n_layer, n_head, n_embd, block_size): chat, shakespeare, then wider and deeper up to GPT-2 small's body.
SIZES = [(4, 4, 256, 128), (6, 6, 384, 256), (8, 8, 512, 256), (12, 10, 640, 512), (12, 12, 768, 1024)]


def endless_run(root: Path, n_layer: int, n_head: int, n_embd: int, block_size: int) -> Path:
    """A run with random weights whose answers never end their turn: ln_f adds 10 along one axis,
    where the stop ids' embeddings hold -10, so their logits sit near -100."""
    tok = CharTokenizer(VOCAB)
    torch.manual_seed(0)
    cfg = config.ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=n_layer,
                             n_head=n_head, n_embd=n_embd)  # fmt: skip
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.transformer.ln_f.bias[0] = 10.0
        for stop in DialogueTemplate().stop_ids:
            model.transformer.wte.weight[stop, 0] = -10.0
    run = root / f"run-{n_layer}x{n_embd}"
    checkpoint.save(run / "best", model, tok, {"step": 0, "val_loss": None, "chat_template": "dialogue"})
    return run


def python_speed(bot: Chatbot, chars: int, threads: int | None = None) -> float:
    """One answer's characters/s; ``threads``: torch's for this answer only (default: as it is)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return _python_speed(bot, chars)
    finally:
        torch.set_num_threads(before)


def _python_speed(bot: Chatbot, chars: int) -> float:
    sample = SampleConfig(max_new_tokens=chars, temperature=0.7, top_k=40, seed=0)
    info = ReplyInfo()
    start = time.perf_counter()
    for _ in bot.answer([Turn("user", MESSAGE)], sample, info=info):
        pass
    return info.completion_tokens / (time.perf_counter() - start)


def open_page(browser: Browser, html: Path) -> tuple[Page, float]:
    """A page of ``html`` with its model ready, and the seconds that took."""
    page = browser.new_page()
    start = time.perf_counter()
    page.goto(html.as_uri(), timeout=600_000)
    expect(page.locator("body")).to_have_attribute("data-ready", "yes", timeout=600_000)
    return page, time.perf_counter() - start


def page_speed(page: Page, chars: int) -> float:
    """One answer in the page, timed by the page itself (from the question to the worker's end)."""
    page.locator("#reset").click()
    page.locator("#max-tokens").fill(str(chars))
    page.locator("#seed").fill("0")
    page.locator("#input").fill(MESSAGE)
    page.locator("#input").press("Enter")
    reply = page.locator(".msg.assistant")
    expect(reply).to_have_attribute("data-state", "done", timeout=600_000)
    return int(reply.get_attribute("data-completion-tokens") or 0) / (
        float(reply.get_attribute("data-ms") or 0) / 1000
    )


def compare(browser: Browser, root: Path, chars: int, rounds: int) -> list[dict[str, Any]]:
    run = endless_run(root, *SIZES[0])
    chat = Chatbot.from_run(run, device="cpu")
    textbook = Chatbot.from_run(run, device="cpu", engine="reference")
    pages = {dtype: open_page(browser, export_web(run, root / f"{dtype}.html", dtype).path)[0]
             for dtype in ("fp32", "fp16")}  # fmt: skip
    # The reference first: `minigpt2 chat` on one thread, as the page's worker has one.
    paths: dict[str, Callable[[], float]] = {
        "python: minigpt2 chat (1 thread)": lambda: python_speed(chat, chars, threads=1),
        f"python: minigpt2 chat ({torch.get_num_threads()} threads)": lambda: python_speed(chat, chars),
        "python: textbook model (1 thread)": lambda: python_speed(textbook, chars, threads=1),
        "chromium page, fp32 (1 thread)": lambda: page_speed(pages["fp32"], chars),
        "chromium page, fp16 (1 thread)": lambda: page_speed(pages["fp16"], chars),
    }
    python_speed(chat, 20)  # warm-up
    speeds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, measure in paths.items():
            speeds[name].append(measure())
    reference = statistics.median(next(iter(speeds.values())))
    return [{"path": name, "chars_per_s": statistics.median(v), "vs_chat": statistics.median(v) / reference,
             "rounds": " ".join(f"{x:.0f}" for x in v)} for name, v in speeds.items()]  # fmt: skip


def load_sizes(browser: Browser, root: Path, chars: int) -> list[dict[str, Any]]:
    web_export.MAX_PARAMS = 10**12  # measuring where the limit belongs: none while measuring
    rows = []
    for shape in SIZES:
        run = endless_run(root, *shape)
        n_params = checkpoint.load(run).build_model().num_params()
        for dtype in ("fp32", "fp16"):
            start = time.perf_counter()
            written = export_web(run, root / "size.html", dtype, force=True)
            export_s = time.perf_counter() - start
            page, open_s = open_page(browser, written.path)
            rows.append({"shape": f"{shape[0]}x{shape[2]}, ctx {shape[3]}", "params_M": n_params / 1e6,
                         "dtype": dtype, "page_MB": written.size_bytes / 1e6, "export_s": export_s,
                         "open_s": open_s, "chars_per_s": page_speed(page, chars)})  # fmt: skip
            print(rows[-1], flush=True)
            page.close()
        shutil.rmtree(run)  # the big ones take hundreds of MB
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chars", type=int, default=300, help="characters per answer (CHAT_SAMPLE's 300)")
    parser.add_argument("--rounds", type=int, default=5, help="the paths take turns this many times")
    parser.add_argument("--load-sizes", action="store_true", help="also measure bigger pages")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        rows = compare(browser, Path(tmp), args.chars, args.rounds)
        sizes = load_sizes(browser, Path(tmp), 50) if args.load_sizes else []
        version = browser.version
        browser.close()
    print(f"`chat` preset's shape, random weights; answers of {args.chars} characters; torch threads:"
          f" {torch.get_num_threads()}; Chromium {version}'s worker: 1 thread")  # fmt: skip
    print_table(rows, ["path", "chars_per_s", "vs_chat", "rounds"])
    if sizes:
        print()
        print_table(sizes, ["shape", "params_M", "dtype", "page_MB", "export_s", "open_s", "chars_per_s"])
    figures: dict[str, Any] = {row["path"]: round(row["chars_per_s"], 1) for row in rows}
    figures["page_fp32_vs_chat"] = round(next(r["vs_chat"] for r in rows if "fp32" in r["path"]), 3)
    if sizes:
        figures["sizes"] = [
            {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in sizes
        ]
    emit(figures)


if __name__ == "__main__":
    main()
