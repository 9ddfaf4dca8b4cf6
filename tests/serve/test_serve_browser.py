"""End-to-end tests of the web chat page of ``minigpt2 serve``, in headless Chromium via Playwright.

A real uvicorn server (``helpers_serve.running``) serves a tiny untrained model; the page is driven
like a user would: Enter sends (a non-ASCII message, to prove UTF-8 survives both ways), Shift+Enter
starts a new line, the answer streams in several chunks and the model name comes from /v1/models;
Regenerate replaces the last answer and Reset clears the transcript; Stop ends the answer in the page
and its generation on the server; an API key is asked for on a 401 (a wrong one shows the error and
is forgotten, one no browser can send is refused, so the tab never stays broken); a server error
(max_tokens over the limit) is shown without leaving an empty bot bubble; a failure in the middle of
an answer shows the server's message and the broken answer is not sent back; an empty answer says
so; and the page loads with no console error (no request for a missing favicon).

Needs Debian's Chromium at /usr/bin/chromium (Playwright's own browser download is not used); without
it the module is skipped.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Dialog, Page, expect, sync_playwright

from helpers_serve import Paced, Scripted, running, tiny_chatbot
from minigpt2.core.chat import Chatbot, Turn
from minigpt2.core.config import SampleConfig
from minigpt2.core.generate import make_generator
from minigpt2.serve import ServeConfig
from minigpt2.serve.app import batch_decoder

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
TIMEOUT = 20_000  # ms, for every auto-waiting expect and action

expect.set_options(timeout=TIMEOUT)
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page in its own context (so no API key is left in sessionStorage)."""
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT)
    yield context.new_page()
    context.close()


def bot(seed: int = 0) -> Chatbot:
    chatbot = tiny_chatbot()
    chatbot.sample = SampleConfig(max_new_tokens=40, temperature=1.0, seed=seed)
    return chatbot


def send(page: Page, text: str) -> None:
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")


def finished_reply(page: Page) -> str:
    """Waits for the one bot bubble to finish streaming and returns its text."""
    reply = page.locator(".msg.assistant")
    expect(reply).to_have_count(1)
    expect(reply).to_have_attribute("data-state", "done")
    expect(page.locator("body")).to_have_attribute("data-busy", "no")
    return reply.evaluate("el => el.textContent")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def generating(health: dict[str, Any]) -> bool:
    """Whether /health reports an answer running or a row of the batch still generating."""
    return bool(health["active"] or health["rows"])


def test_enter_sends_and_the_reply_streams_in_utf8(page: Page) -> None:
    """The reply shows while it is written: the test lets the decoder take a few steps, sees part
    of the answer in a bubble still streaming, then lets it finish (no count of chunks, which
    depends on the machine's speed)."""
    chatbot = bot(seed=0)
    message = "ciao, città è bella"
    # The page starts from the server's defaults: the bot's temperature 1.0 and top-k 0 (all), and
    # ServeConfig's 300 characters; the bot's seed makes it repeatable.
    sample = SampleConfig(max_new_tokens=300, temperature=1.0, top_k=0, seed=0)
    raw = "".join(chatbot.answer([Turn("user", message)], sample, generator=make_generator(0)))
    expected = raw.strip()
    assert len(expected) > 4
    paced = Paced(chatbot, 4)
    with running(chatbot, ServeConfig(model_id="tiny-test"), decoder=lambda: paced) as url:
        page.goto(url)
        expect(page.locator("#model")).to_have_text("tiny-test")
        send(page, message)
        expect(page.locator(".msg.user")).to_have_js_property("textContent", message)
        expect(page.locator("#input")).to_have_value("")
        reply = page.locator(".msg.assistant")
        paced.allow(len(raw) - len(raw.lstrip()) + 3)  # the answer's first three characters
        expect(reply).to_have_text(re.compile(r"\S"), timeout=30_000)
        partial = reply.evaluate("el => el.textContent")
        assert reply.get_attribute("data-state") == "streaming" and expected.startswith(partial)
        assert 0 < len(partial) < len(expected)  # shown before the answer was whole
        paced.unlimited = True
        text = finished_reply(page)
    assert text == expected
    assert page.locator("#error").text_content() == ""


def test_a_seed_repeats_the_answer_and_a_blank_one_draws_afresh(page: Page) -> None:
    """The seed control (shared with the exported page): it starts from the server's default seed
    (this bot's, 0); a seed goes in the request and Regenerate then gives the same answer; a blank
    one asks for a fresh draw (a negative seed), even from a server started with a seed."""
    with running(bot()) as url:
        page.goto(url)
        expect(page.locator("#seed")).to_have_value("0")
        page.locator("#seed").fill("7")
        with page.expect_request("**/v1/chat/completions") as request:
            send(page, "ciao")
        assert request.value.post_data_json["seed"] == 7
        first = finished_reply(page)
        with page.expect_request("**/v1/chat/completions"):
            page.locator("#regenerate").click()
        assert finished_reply(page) == first
        page.locator("#seed").fill("")
        with page.expect_request("**/v1/chat/completions") as request:
            page.locator("#regenerate").click()
        assert request.value.post_data_json["seed"] < 0
        answered = page.locator(".msg.assistant[data-state=done], .msg.assistant[data-state=empty]")
        expect(answered).to_have_count(1)  # (a fresh draw from random weights may say nothing)
        page.locator("#max-tokens").fill("")  # a blank length: the server's default, not 0
        with page.expect_request("**/v1/chat/completions") as request:
            page.locator("#regenerate").click()
        assert "max_tokens" not in request.value.post_data_json
        expect(answered).to_have_count(1)


def test_shift_enter_starts_a_new_line(page: Page) -> None:
    with running(bot()) as url:
        page.goto(url)
        box = page.locator("#input")
        box.fill("first line")
        box.press("Shift+Enter")
        box.press_sequentially("second line")
        expect(box).to_have_value("first line\nsecond line")
        expect(page.locator(".msg")).to_have_count(0)
        box.press("Enter")
        expect(page.locator(".msg.user")).to_have_js_property("textContent", "first line\nsecond line")
        finished_reply(page)


def test_regenerate_replaces_the_answer_and_reset_clears(page: Page) -> None:
    with running(bot(seed=0)) as url:
        page.goto(url)
        send(page, "ciao")
        finished_reply(page)
        page.locator(".msg.assistant").evaluate("el => { el.dataset.old = 'yes'; }")
        with page.expect_request("**/v1/chat/completions") as request:
            page.locator("#regenerate").click()
        # The old answer is not sent back: the model is asked again for the user's turn alone.
        assert request.value.post_data_json["messages"] == [{"role": "user", "content": "ciao"}]
        finished_reply(page)
        expect(page.locator(".msg.assistant[data-old]")).to_have_count(0)
        expect(page.locator(".msg.user")).to_have_count(1)
        page.locator("#reset").click()
        expect(page.locator("#transcript .msg")).to_have_count(0)
        expect(page.locator("#regenerate")).to_be_disabled()


def test_stop_ends_the_answer_in_the_page_and_on_the_server(page: Page) -> None:
    chatbot = bot()
    slow = Scripted(chatbot.tokenizer, delay=0.02)
    with running(chatbot, decoder=lambda: slow) as url:
        page.goto(url)
        page.locator("#max-tokens").fill("1000")
        send(page, "talk for long")
        reply = page.locator(".msg.assistant")
        expect(reply).to_have_attribute("data-state", "streaming")
        expect(reply).not_to_have_attribute("data-chunks", "0")
        expect(page.locator("#stop")).to_be_enabled()
        page.locator("#stop").click()
        expect(reply).to_have_attribute("data-state", "stopped")
        expect(page.locator("body")).to_have_attribute("data-busy", "no")
        deadline = time.monotonic() + 10
        while generating(health := get_json(url + "health")) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not generating(health), health
    assert slow.cancelled == 1, "the server kept generating after the page stopped reading"
    assert 0 < slow.produced < 1000
    expect(reply).to_have_text(re.compile(r"^a+"))  # what had arrived stays


def test_api_key_is_asked_for_and_a_wrong_one_is_shown(page: Page) -> None:
    keys = iter(["wrong", "wrong again", "sekret"])
    prompts: list[str] = []

    def answer(dialog: Dialog) -> None:
        prompts.append(dialog.message)
        dialog.accept(next(keys))

    page.on("dialog", answer)
    with running(bot(), ServeConfig(api_key="sekret", model_id="keyed")) as url:
        page.goto(url)  # the page asks for the model at once: the first prompt
        expect(page.locator("#model")).to_contain_text("API key")
        send(page, "first try")  # a second prompt, answered wrongly again
        expect(page.locator("#error")).to_contain_text("API key")
        expect(page.locator("body")).to_have_attribute("data-busy", "no")
        expect(page.locator(".msg.assistant")).to_have_count(0)
        send(page, "second try")  # the third prompt gets the right key
        finished_reply(page)
        expect(page.locator("#error")).to_have_text("")
        expect(page.locator("#model")).to_have_text("keyed")  # named once the key is known
    assert len(prompts) == 3 and all("API key" in p for p in prompts), prompts


def test_server_error_is_shown_and_no_empty_bubble_stays(page: Page) -> None:
    with running(bot(), ServeConfig(max_tokens=50, default_max_tokens=50)) as url:
        page.goto(url)
        expect(page.locator("#max-tokens")).to_have_value("50")  # the server's default, not the page's
        page.locator("#max-tokens").fill("500")
        send(page, "ciao")
        expect(page.locator("#error")).to_have_text("max_tokens must be in [1, 50], got 500")
        expect(page.locator("body")).to_have_attribute("data-busy", "no")
        expect(page.locator(".msg.assistant")).to_have_count(0)
        expect(page.locator(".msg.user")).to_have_count(1)


def test_the_page_loads_without_console_errors(page: Page) -> None:
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url))
    with running(bot(), ServeConfig(model_id="quiet")) as url:
        page.goto(url)
        expect(page.locator("#model")).to_have_text("quiet")
        page.wait_for_load_state("networkidle")  # what the browser fetches by itself, fetched
    assert problems == []
    assert not any(u.endswith("/favicon.ico") for u in asked), asked
    assert page.locator("link[rel=icon]").count() == 1  # declared: no browser asks for /favicon.ico


def test_a_failure_mid_answer_is_shown_and_left_out_of_the_conversation(page: Page) -> None:
    chatbot = bot()
    broken = Scripted(chatbot.tokenizer, "half an answer", fail=RuntimeError("the model fell over"),
                      fail_after=len("half an answer"))  # fmt: skip
    # The server makes a fresh decoder after a step fails: the real one, so the model works again.
    decoders = iter([broken])
    with running(chatbot, decoder=lambda: next(decoders, None) or batch_decoder(chatbot, 2)) as url:
        page.goto(url)
        send(page, "ciao")
        expect(page.locator("#error")).to_have_text("internal error: the model fell over")
        broken = page.locator(".msg.assistant")
        expect(broken).to_have_attribute("data-state", "error")  # kept on screen, marked as failed
        expect(broken).to_have_text("half an answer")
        expect(page.locator("body")).to_have_attribute("data-busy", "no")
        with page.expect_request("**/v1/chat/completions") as request:
            send(page, "again")
        assert request.value.post_data_json["messages"] == [
            {"role": "user", "content": "ciao"}, {"role": "user", "content": "again"}
        ]  # fmt: skip
        answered = page.locator(".msg.assistant[data-state=done], .msg.assistant[data-state=empty]")
        expect(answered).to_have_count(1)  # (random weights may well say nothing)
        expect(page.locator("#error")).to_have_text("")


def test_an_empty_answer_says_so(page: Page) -> None:
    chatbot = bot()
    nothing = Scripted(chatbot.tokenizer, "")
    with running(chatbot, decoder=lambda: nothing) as url:
        page.goto(url)
        send(page, "ciao")
        reply = page.locator(".msg.assistant")
        expect(reply).to_have_attribute("data-state", "empty")
        expect(reply).to_have_text("(the answer was empty)")
        expect(page.locator("body")).to_have_attribute("data-busy", "no")


def test_a_key_no_browser_can_send_or_a_wrong_one_is_forgotten(page: Page) -> None:
    keys = iter(["clé-秘密", "wrong", "sekret"])
    prompts: list[str] = []

    def answer(dialog: Dialog) -> None:
        prompts.append(dialog.message)
        dialog.accept(next(keys))

    page.on("dialog", answer)
    # A key no browser can send, left in this tab's storage by an earlier page: it must not break it.
    page.add_init_script("sessionStorage.setItem('minigpt2-api-key', 'clé-秘密')")
    stored = "() => sessionStorage.getItem('minigpt2-api-key')"
    with running(bot(), ServeConfig(api_key="sekret", model_id="keyed")) as url:
        page.goto(url)  # the first prompt, answered with a key fetch() would refuse to send
        expect(page.locator("#model")).to_contain_text("printable ASCII")
        assert page.evaluate(stored) in (None, "clé-秘密")  # ignored either way: never sent
        send(page, "first try")  # the second prompt, answered with a wrong key
        expect(page.locator("#error")).to_contain_text("missing or wrong API key")
        expect(page.locator("body")).to_have_attribute("data-busy", "no")
        assert page.evaluate(stored) is None  # a key the server refused is not kept
        send(page, "second try")  # the third prompt gets the right key
        finished_reply(page)
        expect(page.locator("#model")).to_have_text("keyed")
    assert len(prompts) == 3 and all("missing or wrong API key" in p for p in prompts), prompts
