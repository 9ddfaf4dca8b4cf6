"""Tests for ``minigpt2.notebook.attention_maps``: the heads' attention over the bot's last answer.

The weights are the textbook attention's own (each row a probability distribution over the past,
zero on the future), taken at the positions that wrote the answer's characters; the model is left
as it was (no weights kept afterwards), on either engine. Run with ``pytest
tests/notebook/test_attention_maps.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from minigpt2.core.chat import Chatbot, Turn, build_prompt, prompt_budget
from minigpt2.core.model import GPT
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.errors import UserError
from minigpt2.fast import speed_up
from minigpt2.notebook.attention_maps import answer_attention


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_answer_attention_is_the_textbook_attention_at_the_answers_positions(
    make_model: Callable[..., GPT], tok: CharTokenizer, engine: str
) -> None:
    model = make_model(vocab_size=tok.vocab_size, block_size=48, n_head=2, spread=0.3)
    if engine == "fast":
        speed_up(model)
    bot = Chatbot(model, tok)
    bot.history = [Turn("user", "Hello there"), Turn("bot", "Hi, how are you?")]
    amap = answer_attention(bot, layer=1)
    prompt = build_prompt(bot.history[:-1], bot.template, tok, prompt_budget(48, bot.reply_room))
    ids = prompt + tok.encode("Hi, how are you?")
    A, T = len("Hi, how are you?"), len(ids)
    assert amap.layer == 1 and amap.weights.shape == (2, A, T)
    assert len(amap.rows) == A and len(amap.cols) == T and amap.rows[3] == "␣"
    torch.testing.assert_close(amap.weights.sum(-1), torch.ones(2, A))  # distributions
    for i in range(A):  # the position that wrote character i sees only itself and the past
        seen = T - A + i  # that position is seen + ... - 1; it may look at columns 0 .. seen - 1
        assert torch.all(amap.weights[:, i, seen:] == 0)
    # The same numbers, written out by hand for head 0's last row.
    block = model.transformer.h[1]
    with torch.inference_mode():
        x = model.transformer.wte(torch.tensor([ids])) + model.transformer.wpe(torch.arange(T))
        x = model.transformer.h[0](x)
        q, k, _ = block.attn.c_attn(block.ln_1(x)).split(model.config.n_embd, dim=2)
        hs = model.config.n_embd // 2
        scores = q[0, T - 2, :hs] @ k[0, : T - 1, :hs].T / math.sqrt(hs)
    torch.testing.assert_close(amap.weights[0, -1, : T - 1], torch.softmax(scores, -1), atol=1e-5, rtol=1e-4)
    # The model is left as it was: its own attention kernel, no hook.
    assert block.attn.attn_impl == model.config.attn_impl and not block.attn.attn_dropout._forward_hooks


def test_answer_attention_refuses_what_it_cannot_show(
    make_model: Callable[..., GPT], tok: CharTokenizer
) -> None:
    bot = Chatbot(make_model(vocab_size=tok.vocab_size, block_size=32), tok)
    with pytest.raises(UserError, match="no answer"):
        answer_attention(bot)
    bot.history = [Turn("user", "Hi"), Turn("bot", "Yes")]
    for layer in (2, -3, 1.0, True):
        with pytest.raises(UserError, match="layer must be"):
            answer_attention(bot, layer)  # type: ignore[arg-type]
    assert answer_attention(bot, -1).layer == 1
