"""The textbook (``src/minigpt2/core/``) stands on its own: it imports torch, the standard library,
``minigpt2.errors`` and itself, nothing of the product; and what moved out of it says where it went.

Run with ``pytest tests/core/test_textbook.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers_train import subprocess_env

CORE = Path(__file__).resolve().parents[2] / "src" / "minigpt2" / "core"


def test_the_textbook_imports_nothing_of_the_product() -> None:
    modules = sorted(f"minigpt2.core.{p.stem}" for p in CORE.glob("*.py") if p.stem != "__init__")
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('minigpt2'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=subprocess_env())  # fmt: skip
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split()
    outside = [
        m for m in loaded if not m.startswith("minigpt2.core") and m not in ("minigpt2", "minigpt2.errors")
    ]
    assert not outside, f"the textbook imports {outside}"
    assert set(modules) <= set(loaded)


@pytest.mark.parametrize("name", ["save", "load", "set_option", "next_char_probs"])
def test_what_moved_out_of_the_textbooks_chatbot_says_where_it_is(tok: object, name: str) -> None:
    from minigpt2.core.chat import Chatbot
    from minigpt2.core.config import ModelConfig
    from minigpt2.core.model import GPT

    bot = Chatbot(GPT(ModelConfig(vocab_size=60, block_size=8, n_layer=1, n_head=1, n_embd=8)), tok)  # type: ignore[arg-type]
    with pytest.raises(AttributeError, match=r"minigpt2\.inference\.Chatbot"):
        getattr(bot, name)
    with pytest.raises(AttributeError, match=r"minigpt2\.inference\.Chatbot"):
        Chatbot.from_run("runs/x")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bot.nope  # noqa: B018 - an ordinary missing attribute stays ordinary


@pytest.mark.parametrize(("old", "new"), [("minigpt2.checkpoint", "minigpt2.storage.checkpoint"),
                                          ("minigpt2.training.optim", "minigpt2.core.optim")])  # fmt: skip
def test_a_module_imported_by_its_old_name_says_where_it_moved(old: str, new: str) -> None:
    import importlib

    with pytest.raises(ModuleNotFoundError, match=new.replace(".", r"\.")):
        importlib.import_module(old)
