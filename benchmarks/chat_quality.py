"""The default chatbot's quality for its time: its recipe against the dialogues alone, side by side.

    python benchmarks/chat_quality.py                      # english, 8 minutes each
    python benchmarks/chat_quality.py --lang italian --minutes 8

Each recipe prepares its data (the same validation conversations: the corpus's own split), trains
with the real training loop for the same wall-time budget, and reports its best val loss, counted
on every character of the validation conversations whatever the training loss counts, so the
figures compare. Then the best checkpoint answers the first message of each validation
conversation (the chatbot's own sampling, seeded), and the benchmark counts the share of the
answers' words (of three letters or more) that are words of the corpus (a word it never saw is
usually misspelt).
Recipes run in turn; a busy machine shortens both budgets alike only if it stays busy, so run it
on a quiet one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_model, emit, print_table

from minigpt2 import data
from minigpt2.core.config import CHAT_SAMPLE, SampleConfig
from minigpt2.data import corpora
from minigpt2.inference.chatbot import Chatbot
from minigpt2.training import recipes
from minigpt2.training.trainer import train

WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")  # letters, with inner apostrophes (don't, l'altro)


def words(text: str) -> list[str]:
    """The words of ``text`` of three letters or more: shorter ones match a corpus word by chance
    too often (an untrained model's gibberish scored 38% with them; random letters score 0.1% without)."""
    return [w for w in WORD.findall(text.lower()) if len(w) >= 3]


def word_share(run: Path, questions: list[str], known: set[str], seed: int = 0) -> tuple[float, list[str]]:
    """The share of the words in the answers to ``questions`` that are in ``known``, and the answers."""
    sample = SampleConfig(**{**vars(CHAT_SAMPLE), "seed": seed})
    bot = Chatbot.from_run(run, sample=sample)
    answers = []
    for question in questions:
        bot.reset()
        answers.append(bot.reply(question))
    found = [w for a in answers for w in words(a)]
    return sum(w in known for w in found) / max(1, len(found)), answers


def run_recipe(name: str, recipe: recipes.ChatRecipe, source: str, minutes: float, tmp: Path,
               questions: list[str], known: set[str]) -> dict[str, Any]:  # fmt: skip
    data_dir, run_dir = tmp / f"data-{name}", tmp / f"run-{name}"
    # What `make chat` trains: the recipe, its width fitted to this machine and the budget.
    model_cfg, train_cfg = recipes.recipe_configs(recipe, overrides={"max_minutes": minutes})
    meta = data.prepare(source, data_dir, block_size=model_cfg.block_size, mix=recipe.mix,
                        mix_share=recipe.mix_share)  # fmt: skip
    result = train(data_dir, run_dir, model_cfg, train_cfg)
    share, answers = word_share(run_dir, questions, known)
    width = json.loads((run_dir / "config.json").read_text())["model"]["n_embd"]
    return {"recipe": name, "width": width, "precision": result.precision,
            "best_val_loss": result.best_val_loss, "best_step": result.best_step,
            "steps": result.steps, "minutes": result.wall_time_s / 60, "real_words": share,
            "train_chars": meta["train_tokens"], "mix": recipe.mix or "-",
            "examples": answers[:3]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lang", default="english", help="chatterbot-corpus language (default english)")
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget of each recipe")
    parser.add_argument("--questions", type=int, default=60, help="validation questions to answer")
    parser.add_argument("--only", choices=["alone", "recipe"], help="train one recipe only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    source = f"chatterbot:{args.lang}"
    conversations = corpora.chatterbot_conversations(args.lang)
    _, val_convs = data.split_conversations(conversations, 0.1)
    questions = [c[0] for c in val_convs[: args.questions]]
    known = {w for c in conversations for turn in c for w in words(turn)}
    chosen = {"alone": recipes.ALONE, "recipe": recipes.recipe_for(source)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, recipe in chosen.items():
            if args.only in (None, name):
                rows.append(run_recipe(name, recipe, source, args.minutes, Path(tmp), questions, known))
    print(
        f"\n{source}, {args.minutes:g} minutes each, {len(questions)} validation questions; {cpu_model()},"
        f" {os.cpu_count()} cores, {datetime.date.today()}"
    )
    print_table(rows, ["recipe", "mix", "train_chars", "width", "precision", "steps", "best_step", "minutes",
                       "best_val_loss", "real_words"])  # fmt: skip
    for r in rows:
        for question, answer in zip(questions, r["examples"], strict=False):
            print(f"  [{r['recipe']}] {question!r} -> {answer!r}")
    emit({"source": source, "minutes": args.minutes, "cpu": cpu_model(), "rows": rows})


if __name__ == "__main__":
    main()
