"""The exported web page (``minigpt2.exports.web.export_web``), driven in headless Chromium via Playwright.

Each test exports a tiny checkpoint built here (random weights, widened so that answers vary with
the message), opens the page from disk (``file://``) with every other request aborted, and checks
what ``minigpt2 chat`` would say: greedy answers equal ``Chatbot``'s character for character in
fp32, for single messages and over a conversation that trims its history and slides the window;
the agreement of fp16 is measured; a seed repeats its sampled answer; Stop and Reset; a play-template
(text-only) model; the page's header. Every test also asserts that the page made no request outside
the file and logged no console error. Without Chromium the browser tests are skipped; the checks of
the target and the size limit run anyway.

Needs Debian's Chromium at /usr/bin/chromium (Playwright's own browser download is not used).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from playwright.sync_api import Browser, Locator, Page, Route, expect, sync_playwright

from minigpt2.core.chat import Chatbot, Turn, make_template
from minigpt2.core.config import ModelConfig, SampleConfig
from minigpt2.core.model import GPT
from minigpt2.core.stream import generate_ids
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.errors import UserError
from minigpt2.exports.web import export as web
from minigpt2.exports.web import export_web
from minigpt2.storage import checkpoint

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
TIMEOUT = 60_000  # ms, for every wait on the page: generous, as the machine may be busy
expect.set_options(timeout=TIMEOUT)
LOCAL = ("file:", "blob:", "data:")  # the page itself, its worker's code, its empty icon
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}")

# ASCII, and é: an accent typed as e + combining accent must reach the model as é (NFC) in both.
CHARS = sorted(set(" \n!',-.:;?\"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyzé"))
MESSAGES = [
    "Hello there",
    "How are you today?",
    "What is AI? Tell me…",
    "caf\u00e9 or cafe\u0301 \u2019 \U0001f600",
    "ok",
]


def tiny_run(tmp_path: Path, template: str = "dialogue", seed: int = 0, **shape: int) -> tuple[Path, GPT]:
    """A run holding a random model whose matrices are widened (std 2 / sqrt(fan-in)), so that its
    greedy answers vary with the message instead of repeating one character."""
    tok = CharTokenizer(CHARS)
    torch.manual_seed(seed)
    dims = {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, **shape}
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, **dims)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" not in name:
                p.normal_(0.0, 2.0 / math.sqrt(p.size(1))) if p.dim() == 2 else p.normal_(0.0, 0.1)
    run = tmp_path / f"run-{template}-{seed}"
    meta = {"step": 120, "val_loss": 1.5, "best_val_loss": 1.2345, "chat_template": template}
    checkpoint.save(run / "best", model, tok, meta)
    return run, model


def python_bot(run: Path, max_new_tokens: int = 60) -> Chatbot:
    """The chatbot `minigpt2 chat` would be, greedy, over the run's saved weights."""
    model, tok, ckpt = checkpoint.load_model(run)
    template = make_template(ckpt.meta["chat_template"])
    return Chatbot(model, tok, template, sample=SampleConfig(max_new_tokens=max_new_tokens, temperature=0))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


@dataclass
class Chat:
    """A page of the export, with what it asked the network for and what it logged as errors."""

    page: Page
    requests: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def open(self, html: Path) -> None:
        self.page.goto(html.as_uri())
        expect(self.locator("body")).to_have_attribute("data-ready", "yes")

    def locator(self, selector: str) -> Locator:
        return self.page.locator(selector)

    def set(self, control: str, value: object) -> None:
        self.locator(control).fill(str(value))

    def send(self, text: str) -> None:
        self.locator("#input").fill(text)
        self.locator("#input").press("Enter")

    def answer(self, n: int) -> str:
        """Waits for the n-th bot bubble to finish and returns its text ("" if it was empty)."""
        reply = self.locator(".msg.assistant").nth(n)
        expect(reply).to_have_attribute("data-state", re.compile("^(done|empty)$"))
        expect(self.locator("body")).to_have_attribute("data-busy", "no")
        if reply.get_attribute("data-state") == "empty":
            return ""
        return str(reply.evaluate("el => el.textContent"))

    def ask(self, text: str) -> str:
        count = self.locator(".msg.assistant").count()
        self.send(text)
        return self.answer(count)


@pytest.fixture
def chat(browser: Browser) -> Iterator[Chat]:
    """A fresh page that may load files only: every other request is aborted and recorded."""
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT)
    page = context.new_page()
    watched = Chat(page)

    def route(r: Route) -> None:
        url = r.request.url
        if url.startswith(LOCAL):
            r.continue_()
        else:
            watched.blocked.append(url)
            r.abort()

    context.route("**/*", route)
    context.on("request", lambda request: watched.requests.append(request.url))
    page.on("console", lambda m: watched.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda error: watched.errors.append(str(error)))
    yield watched
    page_error = page.locator("#error").text_content()
    context.close()
    assert watched.blocked == [], f"the page asked the network for {watched.blocked}"
    assert all(u.startswith(LOCAL) for u in watched.requests), watched.requests
    assert watched.errors == [], watched.errors
    assert page_error == "", page_error


@pytest.fixture(scope="module")
def dialogue(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A dialogue run and its fp32 page, shared by the tests that only read them."""
    tmp = tmp_path_factory.mktemp("dialogue")
    run, _ = tiny_run(tmp)
    return run, export_web(run, tmp / "chatbot.html").path


def tokens(bubble: Locator, kind: str) -> int:
    """The ids an answer's prompt held, or it generated, as the worker reported them."""
    return int(bubble.get_attribute(f"data-{kind}-tokens") or 0)


def greedy(chat: Chat, max_chars: int = 60) -> None:
    chat.set("#temperature", 0)
    chat.set("#max-tokens", max_chars)


@needs_chromium
def test_greedy_answers_equal_the_python_chatbots(chat: Chat, dialogue: tuple[Path, Path]) -> None:
    run, html = dialogue
    bot = python_bot(run)
    chat.open(html)
    size = f"{bot.model.num_params() / 1000:.1f}k"
    expect(chat.locator("#model")).to_have_text(f"{run.name} · {size} parameters · val loss 1.234")
    greedy(chat)
    answers, chunks = [], []
    for message in MESSAGES:
        chat.locator("#reset").click()
        answers.append(chat.ask(message))
        chunks.append(int(chat.locator(".msg.assistant").get_attribute("data-chunks") or 0))
        assert answers[-1] == "".join(bot.answer([Turn("user", message)])), message
    assert len(set(answers)) > 2, answers  # they depend on the message
    assert max(chunks) > 1, f"no answer was streamed in pieces: {chunks}"


@needs_chromium
def test_a_long_conversation_trims_its_history_and_slides_the_window(
    chat: Chat, dialogue: tuple[Path, Path]
) -> None:
    run, html = dialogue
    bot = python_bot(run, max_new_tokens=80)
    chat.open(html)
    greedy(chat, 80)
    messages = ["Hi!", "What's your name?", "Where do you live?", "Do you like music?", "Good night."]
    for i, message in enumerate(messages):
        assert chat.ask(message) == bot.reply(message), f"answer {i} to {message!r}"
    bubbles = chat.locator(".msg.assistant")
    used = [
        tokens(bubbles.nth(i), "prompt") + tokens(bubbles.nth(i), "completion") for i in range(len(messages))
    ]
    assert max(used) > 32, f"no answer went past the 32-character window: {used}"
    turns = [bot.template.turn_ids(t, bot.tokenizer) for t in bot.history]
    assert sum(map(len, turns)) > 32, "the history never had to be trimmed"


@needs_chromium
def test_fp16_agrees_with_fp32(chat: Chat, dialogue: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = dialogue
    html = export_web(run, tmp_path / "half.html", dtype="fp16").path
    bot = python_bot(run)
    chat.open(html)
    greedy(chat)
    same, agreeing, total = 0, 0, 0
    for message in MESSAGES:
        chat.locator("#reset").click()
        expected, got = "".join(bot.answer([Turn("user", message)])), chat.ask(message)
        same += expected == got
        agreeing += common_prefix(expected, got)
        total += max(len(expected), len(got))
    # Measured: 5 of 5 answers identical (289 of 289 characters). fp16 moves the logits by about
    # 0.1% of their spread, so an answer may part from fp32's where two characters are that close.
    print(f"fp16: {same}/{len(MESSAGES)} answers identical, {agreeing}/{total} characters agree")
    assert same >= 4 and agreeing >= 0.9 * total


@needs_chromium
def test_a_seed_repeats_its_sampled_answer(chat: Chat, dialogue: tuple[Path, Path]) -> None:
    _, html = dialogue
    chat.open(html)
    chat.set("#temperature", 1)
    chat.set("#seed", 7)
    first = chat.ask("Tell me something")
    chat.locator("#regenerate").click()
    assert chat.answer(0) == first
    chat.locator("#reset").click()
    assert chat.ask("Tell me something") == first
    answers = set()
    for seed in (1, 2, 3):
        chat.locator("#reset").click()
        chat.set("#seed", seed)
        answers.add(chat.ask("Tell me something"))
    assert len(answers | {first}) > 1, "every seed gave the same answer"


def endless_run(tmp_path: Path) -> tuple[Path, GPT]:
    """The `chat` preset's shape (slow enough in a page to be stopped mid-answer), made never to end
    its turn: ln_f adds 10 along one axis, where the stop ids' embeddings hold -10."""
    run, model = tiny_run(tmp_path, block_size=128, n_layer=4, n_head=4, n_embd=256)
    tok = checkpoint.load(run).tokenizer
    with torch.no_grad():
        model.transformer.ln_f.bias[0] = 10.0
        for stop in make_template("dialogue").stop_ids:
            model.transformer.wte.weight[stop, 0] = -10.0
    checkpoint.save(run / "best", model, tok, checkpoint.load(run).meta)
    return run, model


@needs_chromium
def test_stop_keeps_what_was_said_and_reset_forgets(chat: Chat, tmp_path: Path) -> None:
    run, _ = endless_run(tmp_path)
    html = export_web(run, tmp_path / "endless.html").path
    bot = python_bot(run, max_new_tokens=400)
    chat.open(html)
    greedy(chat, 400)
    chat.send("Talk for long")
    reply = chat.locator(".msg.assistant")
    expect(reply).not_to_have_attribute("data-chunks", "0")
    chat.locator("#stop").click()
    expect(reply).to_have_attribute("data-state", "stopped")
    expect(chat.locator("body")).to_have_attribute("data-busy", "no")
    expect(chat.locator("body")).to_have_attribute("data-worker", "idle")  # the worker stopped too
    said = str(reply.evaluate("el => el.textContent"))
    full = "".join(bot.answer([Turn("user", "Talk for long")]))
    assert said and full.startswith(said) and len(said) < len(full), (said, full)
    # What was said before Stop is part of the conversation, as in `minigpt2 chat`.
    greedy(chat, 20)
    history = [Turn("user", "Talk for long"), Turn("bot", said), Turn("user", "And now?")]
    assert chat.ask("And now?") == "".join(
        bot.answer(history, SampleConfig(max_new_tokens=20, temperature=0))
    )
    greedy(chat, 400)
    chat.send("Talk again")
    expect(reply.nth(2)).not_to_have_attribute("data-chunks", "0")
    chat.locator("#reset").click()
    expect(chat.locator("#transcript .msg")).to_have_count(0)
    expect(chat.locator("body")).to_have_attribute("data-worker", "idle")
    greedy(chat, 20)
    fresh = "".join(bot.answer([Turn("user", "Hello")], SampleConfig(max_new_tokens=20, temperature=0)))
    assert chat.ask("Hello") == fresh


@needs_chromium
def test_a_text_only_model_answers_as_a_speaker_in_a_play(chat: Chat, tmp_path: Path) -> None:
    run, _ = tiny_run(tmp_path, template="play", seed=15, block_size=48)
    html = export_web(run, tmp_path / "play.html", dtype="fp32").path
    bot = python_bot(run)
    chat.open(html)
    greedy(chat)
    lines = ["Who's there?", "Nay, answer me: stand, and unfold yourself.", "  Long live the king!  ",
             "Tis now struck twelve; get thee to bed.", "Have you had quiet guard?"]  # fmt: skip
    for line in lines:
        assert chat.ask(line) == bot.reply(line), line
    # The play's stop string ended at least one answer (a blank line: the next speech would begin).
    raw = [raw_answer(bot, bot.history[: 2 * i + 1]) for i in range(len(lines))]
    assert any("\n\n" in text for text in raw), raw


def common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def raw_answer(bot: Chatbot, history: list[Turn]) -> str:
    """What the model generates after ``history`` up to a stop id, before any stop string applies."""
    prompt = bot.prepare(history).prompt
    ids = generate_ids(bot.model, prompt, bot.sample, stop_ids=bot.template.stop_ids, min_new_tokens=1)
    return bot.tokenizer.decode(list(ids))


def test_a_model_too_big_for_a_page_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpt2_small = 124_439_808  # parameters of the `gpt2` preset's shape with GPT-2's vocabulary
    with pytest.raises(UserError, match=r"too big for a web page") as refused:
        web.check_size(gpt2_small, "fp32", Path("runs/big"))
    assert "\n" not in str(refused.value)
    web.check_size(3_200_000, "fp32", Path("runs/chat"))  # the `chat` preset's 3.2M fit
    run, _ = tiny_run(tmp_path)
    monkeypatch.setattr(web, "MAX_PARAMS", 20_000)  # under the tiny model's 28,672
    for dtype, size in (("fp32", "0.2"), ("fp16", "0.1")):
        with pytest.raises(
            UserError, match=rf"28,672 parameters \(a {size} MB page in {dtype}\), over the 0.02M"
        ):
            export_web(run, tmp_path / "big.html", dtype)
    assert not (tmp_path / "big.html").exists()


def test_the_target_is_checked(tmp_path: Path) -> None:
    run, _ = tiny_run(tmp_path)
    page = tmp_path / "out" / "chatbot.html"
    assert export_web(run, page).path == page  # a new file (and its folder)
    assert export_web(run, page, dtype="fp16").dtype == "fp16"  # an earlier page is replaced
    other = tmp_path / "notes.html"
    other.write_text("<p>mine</p>")
    with pytest.raises(UserError, match=r"not a page written by this export.*--force"):
        export_web(run, other)
    assert other.read_text() == "<p>mine</p>"
    assert web.is_web_export(export_web(run, other, force=True).path)
    refusals = {run: "is a minigpt2 run", run / "best" / "x.html": "best is a minigpt2 checkpoint, whose",
                run / "x.html": "is a minigpt2 run, whose", tmp_path / "out": "is a folder"}  # fmt: skip
    for target, refusal in refusals.items():
        with pytest.raises(UserError, match=refusal):
            export_web(run, target, force=True)
    with pytest.raises(UserError, match="fp32 or fp16"):
        export_web(run, tmp_path / "x.html", dtype="bf16")
