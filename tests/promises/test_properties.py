"""Property-based tests of the inputs that come from outside: machines hunt the hostile cases.

Hypothesis draws the values a user, a client or a file on disk may hold, and each test states the
promise for all of them:

- every sampling setting (any float, any integer, through ``SampleConfig``, the one home of their
  rules): a clean ``ConfigError`` naming the setting, or a config whose draw from any finite
  logits is an id in range (never NaN, never an exception), batched or alone;
- a checkpoint's ``checkpoint.json`` of any JSON shape: a one-line ``UserError`` or a loaded model;
- ``--mix-share`` of any float: a one-line ``UserError`` or a training split with that share;
- any ids a model draws and any stop strings a client asks for: the answer's text (``ReplyText``),
  streamed, is the whole text cut before its first stop string, without spaces at either end; it
  holds back only what could still begin a stop string (or spaces), counts the ids it was given up
  to the end, and ``Chatbot.reply_text`` asks for none after it.

Run with ``pytest tests/promises/test_properties.py`` (bounded: tens of examples each, no deadline, so a
busy machine only makes it slower).
"""

from __future__ import annotations

import json
import math
import shutil
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minigpt2 import data
from minigpt2.core.chat import Chatbot, PlayTemplate
from minigpt2.core.config import ModelConfig, SampleConfig, resolve
from minigpt2.core.generate import make_generator
from minigpt2.core.model import GPT
from minigpt2.core.stream import ReplyInfo, ReplyText, next_token
from minigpt2.core.tokenizer import UNK_ID, CharTokenizer
from minigpt2.errors import ConfigError, UserError
from minigpt2.fast.batch_decoder import draw_together
from minigpt2.storage import checkpoint

BOUNDED = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [1e-300, 5e-324, 1e-46, 1e-40, 2.0]
)
ANY_INT = st.integers(min_value=-(2**70), max_value=2**70)
LOGITS = st.lists(st.floats(min_value=-80, max_value=80), min_size=2, max_size=40)


@BOUNDED
@given(ANY_FLOAT, ANY_FLOAT, ANY_FLOAT, ANY_INT, ANY_INT, st.none() | ANY_INT, LOGITS)
def test_any_sampling_setting_is_refused_by_name_or_draws_an_id(
    temperature: float, top_p: float, penalty: float, top_k: int, length: int, seed: int | None,
    logits: list[float],
) -> None:  # fmt: skip
    values = {"temperature": temperature, "top_p": top_p, "repetition_penalty": penalty, "top_k": top_k,
              "max_new_tokens": length, "seed": seed}  # fmt: skip
    try:
        cfg = SampleConfig(**values)
    except ConfigError as err:
        assert err.setting in values and "\n" not in str(err)
        return
    row = torch.tensor(logits)
    context = torch.tensor([0, 1, 1])
    nxt = next_token(row, cfg, context, make_generator(0))
    assert 0 <= nxt < len(logits)
    if cfg.top_p == 1.0 and cfg.repetition_penalty == 1.0:  # the batched draw takes these rows
        ids = draw_together(
            row.expand(3, -1), cfg.temperature, cfg.top_k, [make_generator(i) for i in range(3)]
        )
        assert all(0 <= i < len(logits) for i in ids)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "best"
    tok = CharTokenizer(list("abcdef"))
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=8))
    checkpoint.save(folder, model, tok, {"step": 1})
    return folder


def _mutations(doc: dict[str, object]) -> st.SearchStrategy[dict[str, object]]:
    """The saved document with one of its fields (or one inside its config or vocabulary) replaced
    by any JSON value, or a key added."""
    paths = [(k,) for k in doc] + [(k, kk) for k, v in doc.items() if isinstance(v, dict) for kk in v]

    def put(path: tuple[str, ...], value: object) -> dict[str, object]:
        changed = json.loads(json.dumps(doc))
        where = changed
        for key in path[:-1]:
            where = where[key]
        where[path[-1]] = value
        return changed

    return st.builds(put, st.sampled_from(paths), JSON) | JSON.map(lambda v: {"x": v} if v is None else v)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_checkpoint_json_of_any_shape_is_one_line_or_a_model(
    saved: Path, tmp_path: Path, data: st.DataObject
) -> None:
    doc = json.loads((saved / checkpoint.META).read_text())
    folder = tmp_path / "copy" / "best"
    shutil.rmtree(folder.parent, ignore_errors=True)
    shutil.copytree(saved, folder)
    mutated = data.draw(_mutations(doc))
    (folder / checkpoint.META).write_text(json.dumps(mutated), encoding="utf-8")
    try:
        model, tok, _ = checkpoint.load_model(folder)
    except UserError as err:
        assert "\n" not in str(err)
        return
    assert isinstance(model, GPT) and model.config.vocab_size == tok.vocab_size


def test_unknown_keys_of_any_characters_are_named_on_one_line(saved: Path, tmp_path: Path) -> None:
    """A key holding a newline, in a checkpoint's config or in a config file, is quoted and
    escaped in the error; a plain name stays as it is."""
    doc = json.loads((saved / checkpoint.META).read_text())
    doc["model_config"]["\n"] = None
    folder = tmp_path / "best"
    shutil.copytree(saved, folder)
    (folder / checkpoint.META).write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(UserError) as found:
        checkpoint.load_model(folder)
    assert "\n" not in str(found.value) and "field(s): '\\n'" in str(found.value)
    with pytest.raises(ConfigError) as found:
        resolve("tiny", file_values={"bad\nkey": 1, "bogus": 2})
    assert str(found.value) == "unknown setting(s): 'bad\\nkey', bogus"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mix")
    (root / "a.txt").write_text("the first source, a text of its own. " * 60, encoding="utf-8")
    (root / "b.txt").write_text("and another text to mix in, with other words. " * 25, encoding="utf-8")
    return root / "a.txt", root / "b.txt"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.9999999, 1e-7, 0.5, 1.0, 0.0]))
def test_any_mix_share_is_one_line_or_that_share(
    sources: tuple[Path, Path], tmp_path: Path, share: float
) -> None:
    first, second = sources
    out = tmp_path / f"d{abs(hash(share))}"
    try:
        meta = data.prepare(str(first), out, block_size=8, mix=str(second), mix_share=share)
    except UserError as err:
        assert "\n" not in str(err) and not out.exists()
        return
    assert 0 < share < 1 and math.isfinite(share)
    assert meta["mix"]["share"] == pytest.approx(share, abs=0.01)
    shutil.rmtree(out)


TEXT_TOK = CharTokenizer(list(" \nab."))
# Any id, the special tokens too (each shown by its spelling, "<|unk|>" not shown).
IDS = st.lists(st.integers(0, TEXT_TOK.vocab_size - 1), max_size=40)


@st.composite
def ids_and_stops(draw: st.DrawFn) -> tuple[list[int], list[str]]:
    """Ids and stop strings: any strings of the characters the ids are shown with, and pieces of
    the ids' own text (so that stop strings are met, often across ids, inside the spelling of a
    special token, or overlapping one another)."""
    ids = draw(IDS)
    text = TEXT_TOK.decode(ids)
    any_stop = st.text(alphabet=" \nab.<|e", max_size=4)
    if text:
        start = draw(st.integers(0, len(text) - 1))
        any_stop |= st.integers(1, 5).map(lambda n: text[start : start + n])
    return ids, draw(st.lists(any_stop, max_size=3))


def whole_text(ids: list[int], stops: list[str]) -> tuple[str, int | None]:
    """The text of ``ids`` taken whole, the slow way: decoded id by id (``<|unk|>`` left out) until
    the text so far holds a stop string, then cut before the first one in it; and how many ids that
    took (None: no stop string came)."""
    text = ""
    for count, i in enumerate(ids, start=1):
        text += "" if i == UNK_ID else TEXT_TOK.decode([i])
        cuts = [text.index(s) for s in stops if s and s in text]
        if cuts:
            return text[: min(cuts)], count
    return text, None


def held_for_a_reason(rest: str, stops: list[str]) -> bool:
    """Whether ``rest`` (text not shown yet) is spaces (which wait for something visible), then the
    start of a stop string or nothing: the only text worth holding back."""
    return any(
        rest[:j].isspace() or j == 0
        for j in range(len(rest) + 1)
        if rest[j:] == "" or any(len(s) > len(rest[j:]) and s.startswith(rest[j:]) for s in stops)
    )


@settings(max_examples=300, deadline=None)
@given(ids_and_stops(), st.integers(1, 50))
def test_an_answers_text_streamed_is_its_whole_text_shown_as_soon_as_it_is_safe(
    drawn: tuple[list[int], list[str]], max_new_tokens: int
) -> None:
    """Pushed one at a time, ids show the text they make as a whole (cut at a stop string, no
    spaces at either end), each piece as soon as nothing after it can turn it into a stop string."""
    ids, stops = drawn
    info = ReplyInfo()
    text = ReplyText(TEXT_TOK, stops, max_new_tokens, info)
    shown, pushed = "", 0
    for k in range(len(ids)):
        if text.ended:
            break
        shown += text.push(ids[k])
        pushed += 1
        so_far, stopped_at = whole_text(ids[: k + 1], stops)
        assert text.ended == (stopped_at is not None)
        visible = so_far.lstrip()  # leading spaces are never shown
        assert visible.startswith(shown)
        held = so_far[len(so_far) - len(visible) + len(shown) :] if shown else so_far
        assert held_for_a_reason(held, stops)
    shown += text.finish()
    whole, stopped_at = whole_text(ids, stops)
    assert shown == whole.strip()
    assert not any(s and s in shown for s in stops)
    assert info.completion_tokens == pushed == (stopped_at or len(ids))
    cut_off = stopped_at is None and len(ids) >= max_new_tokens
    assert info.finish_reason == ("length" if cut_off else "stop")
    assert text.push(TEXT_TOK.encode("a")[0]) == text.finish() == ""  # ended: nothing more


@settings(max_examples=200, deadline=None)
@given(ids_and_stops(), st.booleans())
def test_reply_text_pulls_no_id_after_the_answers_end(drawn: tuple[list[int], list[str]], play: bool) -> None:
    """``Chatbot.reply_text`` reads ids from a generator through ``ReplyText``, with the template's
    stop strings (a play's blank line) added to the caller's."""
    ids, stops = drawn
    model = types.SimpleNamespace(config=types.SimpleNamespace(block_size=16))  # never run
    bot = Chatbot(model, TEXT_TOK, PlayTemplate() if play else None)
    pulled = 0

    def source() -> Iterator[int]:
        nonlocal pulled
        for i in ids:
            pulled += 1
            yield i

    info = ReplyInfo()
    pieces = list(bot.reply_text(source(), 100, info, stops))
    whole, _ = whole_text(ids, [*bot.template.stop_strings, *stops])
    assert "".join(pieces) == whole.strip() and all(pieces)
    assert pulled == info.completion_tokens
