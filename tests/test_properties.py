"""Property-based tests of the inputs that come from outside: machines hunt the hostile cases.

Hypothesis draws the values a user, a client or a file on disk may hold, and each test states the
promise for all of them:

- every sampling setting (any float, any integer, through ``SampleConfig``, the one home of their
  rules): a clean ``ConfigError`` naming the setting, or a config whose draw from any finite
  logits is an id in range (never NaN, never an exception), batched or alone;
- a checkpoint's ``checkpoint.json`` of any JSON shape: a one-line ``UserError`` or a loaded model;
- ``--mix-share`` of any float: a one-line ``UserError`` or a training split with that share.

Run with ``pytest tests/test_properties.py`` (bounded: tens of examples each, no deadline, so a
busy machine only makes it slower).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minigpt2 import checkpoint, data
from minigpt2.core.config import ModelConfig, SampleConfig
from minigpt2.core.generate import make_generator
from minigpt2.core.model import GPT
from minigpt2.core.stream import next_token
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.errors import ConfigError, UserError
from minigpt2.fast.batch import draw_together

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
