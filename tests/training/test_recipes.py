"""Tests for ``minigpt2.training.recipes``: what the default chatbot trains on and with.

Covered: each chatterbot language's recipe and the folders it uses (the data folder names the text
mixed in, the run folder stays ``runs/chat-<source>``); ``ensure_chatbot`` prepares the recipe's
data (mix included), trains the recipe's preset with its overrides, or another preset without
them, and leaves a trained run alone. Tiny configs on CPU, a local text as the mix (no network).
Run: ``pytest -q tests/training/test_recipes.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minigpt2.training import recipes

FAST = {"max_iters": 4, "eval_interval": 2, "eval_iters": 1, "max_minutes": 0, "samples": False}


def test_the_default_recipes_and_their_folders(tmp_path: Path) -> None:
    english = recipes.recipe_for("chatterbot:english")
    assert english.mix == "shakespeare" and english.preset == "chat"
    assert recipes.recipe_for("chatterbot") == english
    assert recipes.recipe_for("chatterbot:italian").mix == "shakespeare"
    data_dir, run_dir = recipes.default_paths("chatterbot:english", tmp_path)
    assert data_dir == tmp_path / "data" / "chatterbot-english+shakespeare"
    assert run_dir == tmp_path / "runs" / "chat-chatterbot-english"
    # A user's own text is trained as it is: nothing mixed in, the folders named after it alone.
    assert recipes.recipe_for("notes/diary.txt") == recipes.ALONE and recipes.ALONE.mix is None
    assert recipes.default_paths("shakespeare", tmp_path)[0] == tmp_path / "data" / "shakespeare"


def test_a_source_names_one_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule of ``prepare``'s default ``--out`` and of the default chatbot's folders alike."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "my diary.txt").write_text("dear diary", encoding="utf-8")
    assert recipes.slug("notes/my diary.txt") == "my_diary"  # an existing file: its stem
    assert recipes.slug("chatterbot:italian") == "chatterbot-italian"
    assert recipes.slug("..") == "__" and recipes.slug("") == "corpus"
    assert recipes.slug("../../etc/x") == "______etc_x"
    assert recipes.default_paths("notes/my diary.txt", tmp_path)[1] == tmp_path / "runs" / "chat-my_diary"


@pytest.fixture
def local_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> recipes.ChatRecipe:
    """The Italian recipe with a local text mixed in and the `tiny` preset, so the test trains fast."""
    text = tmp_path / "extra.txt"
    text.write_text("Quoth the raven: nevermore. " * 300, encoding="utf-8")
    recipe = recipes.ChatRecipe(preset="tiny", overrides={**FAST, "n_embd": 16}, mix=str(text), mix_share=0.4)
    monkeypatch.setattr(recipes, "recipe_for", lambda source: recipe)
    return recipe


def test_ensure_chatbot_trains_the_recipe_on_its_mixed_data(
    tmp_path: Path, local_recipe: recipes.ChatRecipe
) -> None:
    data_dir, run_dir = tmp_path / "data", tmp_path / "run"
    assert recipes.ensure_chatbot("chatterbot:italian", data_dir, run_dir) == run_dir
    meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))
    assert meta["source"] == "chatterbot:italian" and meta["mix"]["source"] == local_recipe.mix
    saved = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    assert saved["model"]["n_embd"] == 16 and saved["train"]["max_iters"] == 4  # the recipe's overrides
    assert recipes.is_ready(run_dir)
    before = (run_dir / "summary.json").read_bytes()
    assert recipes.ensure_chatbot("chatterbot:italian", data_dir, run_dir) == run_dir
    assert (run_dir / "summary.json").read_bytes() == before  # trained once


def test_a_preset_given_replaces_the_recipes_settings_but_not_its_data(
    tmp_path: Path, local_recipe: recipes.ChatRecipe
) -> None:
    data_dir, run_dir = tmp_path / "data", tmp_path / "run"
    recipes.ensure_chatbot("chatterbot:italian", data_dir, run_dir, preset="tiny", overrides=FAST)
    saved = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    assert saved["model"]["n_embd"] == 32  # the tiny preset's own width, not the recipe's 16
    meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))
    assert meta["mix"]["source"] == local_recipe.mix
