"""Looking inside the model: where each head looked while the chatbot wrote its last answer.

``answer_attention(bot, layer)`` runs the model once over the conversation and the bot's last answer
through the written-out attention (``attn_impl="manual"``), reading its weights as they enter the
attention's dropout (a forward hook: the textbook model keeps nothing for it), and returns, for
every head of that layer, one row per character of the answer: the attention of the position that
wrote it (the one before it, whose output predicted it) over every character it could see. The
notebook draws them as heatmaps.
Tests: ``pytest tests/notebook/test_attention_maps.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from minigpt2.core.chat import Chatbot
from minigpt2.core.model import GPT, Block
from minigpt2.errors import UserError

SHOWN = {"\n": "⏎", " ": "␣", "<|user|>": "U:", "<|bot|>": "B:", "<|eot|>": "¶", "<|unk|>": "?"}


@dataclass
class AttentionMap:
    """One layer's attention while the answer was written."""

    layer: int
    weights: Tensor  # (nh, A, K): A answer characters (rows), K characters of the window (columns)
    rows: list[str]  # the answer's characters, as shown
    cols: list[str]  # the window's characters, as shown


def answer_attention(bot: Chatbot, layer: int = -1) -> AttentionMap:
    """The attention of ``layer`` (negative: from the last) over the bot's last answer."""
    model: GPT = bot.model
    n_layer = model.config.n_layer
    if not isinstance(layer, int) or isinstance(layer, bool) or not -n_layer <= layer < n_layer:
        raise UserError(f"layer must be an integer from {-n_layer} to {n_layer - 1}, got {layer!r}")
    if not bot.history or bot.history[-1].role != "bot" or not bot.history[-1].text:
        raise UserError("there is no answer to look at yet; ask the bot something first")
    prompt = bot.prepare(bot.history[:-1]).prompt  # the prompt the answer was written after
    answer = bot.tokenizer.encode(bot.history[-1].text)
    ids = (prompt + answer)[-model.config.block_size :]
    A = min(len(answer), len(ids) - 1)  # answer characters with a position before them in the window
    block: Block = model.transformer.h[layer]  # type: ignore[assignment]
    attention, seen = block.attn, []
    impl = attention.attn_impl
    # The softmax weights are the input of the (in eval mode, identity) attention dropout.
    hook = attention.attn_dropout.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
    attention.attn_impl = "manual"  # the fused kernel never shows its weights
    try:
        with torch.inference_mode():
            model(torch.tensor([ids], device=model.device))
    finally:
        attention.attn_impl = impl
        hook.remove()
    weights = seen[0]  # (1, nh, T, T)
    T = len(ids)
    # Character i of the answer (at position T - A + i) was predicted by position T - A + i - 1.
    rows = weights[0, :, T - A - 1 : T - 1, :].float().cpu()  # (nh, A, T)
    shown = [SHOWN.get(c, c) for c in bot.tokenizer.decode_each(ids)]
    return AttentionMap(layer % n_layer, rows, shown[T - A :], shown)
