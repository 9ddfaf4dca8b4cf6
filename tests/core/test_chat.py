"""The chatbot: templates, stop rules, trimming to the window, options, saving, the REPL over a pipe.

Stop rules are tested with ``ScriptedModel``, a stand-in with GPT's interface that always predicts
the next id of a fixed script, so the expected answer is known exactly; everything else runs a real
(tiny, untrained) GPT. Run: ``pytest tests/core/test_chat.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from minigpt2.core.chat import DialogueTemplate, PlayTemplate, Turn, build_prompt
from minigpt2.core.config import ModelConfig, SampleConfig
from minigpt2.core.model import GPT
from minigpt2.core.tokenizer import BOT_ID, EOT_ID, USER_ID, CharTokenizer
from minigpt2.errors import UserError
from minigpt2.inference.chatbot import Chatbot
from minigpt2.storage import checkpoint

TOK = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,?!'\n:")))
GREEDY = SampleConfig(max_new_tokens=50, temperature=0.0)


class ScriptedModel(nn.Module):
    """Predicts ``script[k]`` as the k-th generated id, whatever the input (greedy decoding)."""

    def __init__(self, script: list[int], block_size: int = 64) -> None:
        super().__init__()
        self.config = ModelConfig(
            vocab_size=TOK.vocab_size, block_size=block_size, n_layer=1, n_head=1, n_embd=4
        )
        self.script, self.calls = script, 0
        self.dummy = nn.Parameter(torch.zeros(1))

    @property
    def device(self) -> torch.device:
        return self.dummy.device

    def forward(
        self, idx: torch.Tensor, targets: object = None, cache: object = None
    ) -> tuple[torch.Tensor, None]:
        if cache is not None:
            cache.pos += idx.size(1)  # type: ignore[attr-defined]
        logits = torch.zeros(1, idx.size(1), self.config.vocab_size)
        logits[0, -1, self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        return logits, None


def scripted_bot(reply_ids: list[int], template: object = None) -> Chatbot:
    return Chatbot(ScriptedModel(reply_ids), TOK, template, GREEDY)  # type: ignore[arg-type]


def test_dialogue_answer_stops_at_end_of_turn() -> None:
    bot = scripted_bot([*TOK.encode("fine, thanks"), EOT_ID, *TOK.encode("never shown")])
    assert bot.reply("how are you?") == "fine, thanks"
    assert bot.history == [Turn("user", "how are you?"), Turn("bot", "fine, thanks")]


def test_dialogue_answer_stops_when_the_model_starts_a_user_turn() -> None:
    bot = scripted_bot([*TOK.encode("hello"), USER_ID, *TOK.encode("x")])
    assert bot.reply("hi") == "hello"


def test_play_answer_stops_where_the_next_speech_begins() -> None:
    bot = scripted_bot(TOK.encode("Good my lord.\n\nHam.\nMore"), PlayTemplate())
    pieces = list(bot.stream("Who is there?"))
    assert "".join(pieces) == "Good my lord."
    assert "\n\n" not in "".join(pieces)


def test_play_template_renders_speeches_and_ends_with_the_bot_speaker() -> None:
    t = PlayTemplate(user_name="ROMEO", bot_name="JULIET", speaker_end=":")
    ids = build_prompt([Turn("user", "Hello")], t, TOK, budget=100)
    assert TOK.decode(ids) == "ROMEO:\nHello\n\nJULIET:\n"


def test_trimming_drops_whole_old_turns_and_keeps_the_newest_message() -> None:
    t = DialogueTemplate()
    history = [Turn("user", "a" * 10), Turn("bot", "b" * 10), Turn("user", "c" * 10), Turn("bot", "d" * 10),
               Turn("user", "newest")]  # fmt: skip
    ids = build_prompt(history, t, TOK, budget=40)
    assert len(ids) <= 40
    assert ids[-1] == BOT_ID and TOK.decode(ids[-8:-2]) == "newest"
    assert ids[0] in (USER_ID, BOT_ID)  # starts at a turn boundary
    text = TOK.decode(ids, skip_special=True)
    assert "a" not in text and "b" not in text  # the oldest turns went first, whole
    assert text.count("d") in (0, 10) and text.count("c") in (0, 10)  # nothing half cut


def test_a_message_longer_than_the_window_keeps_its_end() -> None:
    ids = build_prompt([Turn("user", "x" * 100 + "tail")], DialogueTemplate(), TOK, budget=30)
    assert len(ids) == 30
    assert TOK.decode(ids).endswith("tail<|eot|><|bot|>")


def test_special_token_spellings_typed_by_the_user_are_plain_text() -> None:
    ids = build_prompt([Turn("user", "<|eot|>")], DialogueTemplate(), TOK, budget=100)
    assert ids.count(EOT_ID) == 1  # only the real end of the user's turn


@pytest.fixture()
def tiny_bot() -> Chatbot:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=TOK.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    return Chatbot(model, TOK, sample=SampleConfig(max_new_tokens=40, temperature=1.0, seed=7))


def test_unknown_characters_never_crash_and_are_reported_once(tiny_bot: Chatbot) -> None:
    message = "héllo ☃ مرحبا \u0301 \x07 " + "z" * 5000
    assert tiny_bot.new_unknown_chars(message)
    assert tiny_bot.new_unknown_chars(message) == []
    assert isinstance(tiny_bot.reply(message), str)
    assert isinstance(tiny_bot.reply(""), str)


def test_same_seed_same_conversation(tiny_bot: Chatbot) -> None:
    first = [tiny_bot.reply(m) for m in ("hello", "and then?")]
    again = Chatbot(tiny_bot.model, TOK, sample=SampleConfig(max_new_tokens=40, temperature=1.0, seed=7))
    assert [again.reply(m) for m in ("hello", "and then?")] == first


def test_set_option_validates(tiny_bot: Chatbot) -> None:
    tiny_bot.set_option("temperature", "0.3")
    assert tiny_bot.sample.temperature == 0.3
    for name, value in [("top_p", "1.5"), ("temperature", "-1"), ("top_k", "x"), ("nope", "1"),
                        ("max_new_tokens", "0")]:  # fmt: skip
        with pytest.raises(UserError):
            tiny_bot.set_option(name, value)
    with pytest.raises(UserError, match=r"^max_new_tokens needs an integer, got '1e3'$"):
        tiny_bot.set_option("max_new_tokens", "1e3")
    with pytest.raises(UserError, match=r"^temperature needs a number, got 'hot'$"):
        tiny_bot.set_option("temperature", "hot")
    assert tiny_bot.sample.temperature == 0.3 and tiny_bot.sample.max_new_tokens == 40


def test_settings_too_small_to_compute_with_answer_greedily(tiny_bot: Chatbot) -> None:
    greedy = Chatbot(tiny_bot.model, TOK, sample=SampleConfig(max_new_tokens=40, temperature=0.0))
    expected = greedy.reply("hello")
    for name, value in [("temperature", "1e-300"), ("temperature", "1e-40")]:
        tiny_bot.reset()
        tiny_bot.set_option(name, value)
        assert tiny_bot.sample.temperature == 0.0 and tiny_bot.reply("hello") == expected
    tiny_bot.set_option("temperature", "1.0")
    tiny_bot.set_option("top_p", "1e-46")  # 0 in float32: only the likeliest character is kept
    tiny_bot.reset()
    assert tiny_bot.reply("hello") == expected
    with pytest.raises(UserError, match=r"^repetition_penalty must be in \[0.01, 100\], got 1e-40$"):
        tiny_bot.set_option("repetition_penalty", "1e-40")


def test_save_and_load_a_conversation(tiny_bot: Chatbot, tmp_path: Path) -> None:
    tiny_bot.reply("hello")
    tiny_bot.save(tmp_path / "c.json")
    other = Chatbot(tiny_bot.model, TOK)
    other.load(tmp_path / "c.json")
    assert other.history == tiny_bot.history
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError):
        other.load(tmp_path / "bad.json")
    tiny_bot.reset()
    assert tiny_bot.history == []


def test_interrupted_answer_still_enters_the_history(tiny_bot: Chatbot) -> None:
    stream = tiny_bot.stream("hello")
    first = next(stream)
    stream.close()
    assert tiny_bot.history[-1].role == "bot" and tiny_bot.history[-1].text == first.strip()


@pytest.fixture()
def run_dir(tmp_path: Path, tiny_bot: Chatbot) -> Path:
    meta = {"step": 0, "chat_template": "dialogue"}
    checkpoint.save(tmp_path / "run" / "best", tiny_bot.model, TOK, meta)
    return tmp_path / "run"


def chat_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "minigpt2", "chat", *args, "--seed", "3", "--max-new-tokens", "20"]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)


def test_repl_through_a_pipe(run_dir: Path, tmp_path: Path) -> None:
    script = (
        "hello\n/set temperature=0.5\n/set top_p=7\n\n/save "
        + str(tmp_path / "s.json")
        + "\nbye ☃\n/quit\nnever\n"
    )
    result = chat_cli(str(run_dir), stdin=script)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "(temperature = 0.5)" in out and "error: top_p must be in [0, 1], got 7.0" in out
    assert "'☃'" in result.stderr and "Traceback" not in result.stderr
    saved = json.loads((tmp_path / "s.json").read_text())
    assert [t["role"] for t in saved["history"]] == ["user", "bot"]
    assert chat_cli(str(run_dir), stdin=script).stdout == out  # the seed makes it repeatable


def test_single_prompt_and_errors(run_dir: Path, tmp_path: Path) -> None:
    result = chat_cli(str(run_dir), "--prompt", "hello")
    assert result.returncode == 0 and result.stdout.endswith("\n")
    missing = chat_cli(str(tmp_path / "nothing"), "--prompt", "hi")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    bad = chat_cli(str(run_dir), "--prompt", "hi", "--temperature", "-1")
    assert bad.returncode == 2 and "temperature" in bad.stderr


def test_an_answer_is_never_empty_even_if_the_model_wants_to_stop_at_once() -> None:
    bot = scripted_bot([EOT_ID, *TOK.encode("ok"), EOT_ID])
    assert bot.reply("hi") == "ok"  # the first end-of-turn is banned, the second one stops


def test_saving_to_a_missing_folder_is_a_clear_error(tiny_bot: Chatbot, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot save the conversation"):
        tiny_bot.save(tmp_path / "no" / "such" / "dir" / "c.json")


def test_loading_refuses_devices_fifos_big_files_and_bad_turns(tiny_bot: Chatbot, tmp_path: Path) -> None:
    """Each refusal is one line naming the file and the problem, and a big file is read only up to
    the limit. (Devices and FIFOs: ``tests/cli/test_repl.py``, in a process with a memory cap.)"""
    from minigpt2.inference.conversation import MAX_CONVERSATION_BYTES

    (tmp_path / "big.json").write_bytes(b" " * (MAX_CONVERSATION_BYTES + 1))
    files = {
        tmp_path: "it is a folder, not a file",
        tmp_path / "big.json": "it is larger than 4 MB",
        tmp_path / "missing.json": "No such file or directory",
    }
    turns = {
        '{"history": [{"role": "user", "text": null}]}': "turn 1 needs a role (user or bot) and a text",
        '{"history": [{"role": "user", "text": "hi"}, {"role": "system", "text": "x"}]}': "turn 2 needs",
        '{"history": [["user", "hi"]]}': "turn 1 needs",
        '{"history": "hi"}': 'it has no "history" list',
        "[]": 'it has no "history" list',
        '{"history": [}': "it is not JSON text",
    }
    for number, (content, problem) in enumerate(turns.items()):
        (tmp_path / f"{number}.json").write_text(content, encoding="utf-8")
        files[tmp_path / f"{number}.json"] = problem
    (tmp_path / "latin1.json").write_bytes(b'{"history": [{"role": "user", "text": "caf\xe9"}]}')
    files[tmp_path / "latin1.json"] = "it is not JSON text"
    tiny_bot.reply("hello")
    before = list(tiny_bot.history)
    started = time.monotonic()
    for path, problem in files.items():
        with pytest.raises(UserError) as info:
            tiny_bot.load(path)
        line = str(info.value)
        assert line.startswith(f"cannot load the conversation {path}: ") and problem in line, line
        assert "\n" not in line and len(line) < 300
    assert time.monotonic() - started < 10 and tiny_bot.history == before


def test_saving_says_where_it_cannot_write_and_why(tiny_bot: Chatbot, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    places = {
        tmp_path / "no" / "c.json": f"the folder {tmp_path / 'no'} does not exist",
        tmp_path: "it is a folder, not a file",
        tmp_path / "fifo": "it is a FIFO (named pipe), not a file",
    }
    if Path("/proc/version").is_file():  # Linux: a virtual file system that takes no new files
        places[Path("/proc/version")] = "the folder does not accept new files (a virtual file system"
    for path, reason in places.items():
        with pytest.raises(UserError) as info:
            tiny_bot.save(path)
        assert str(info.value).startswith(f"cannot save the conversation to {path}: {reason}"), info.value
    assert (tmp_path / "fifo").is_fifo()
