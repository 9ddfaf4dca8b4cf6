"""The chatbot: turn templates, conversation history, trimming to the context window, stop rules.

``Chatbot`` is a model, its tokenizer and a template in conversation: ``stream(text)`` yields the
answer as it is generated, ``reply(text)`` returns it whole, ``reset()`` forgets. No ``input()``, no
``print()``, no files: callers decide how to show things, and the product's chatbot
(``minigpt2.inference.Chatbot``: loading a run, options by name, conversations kept in files)
extends this one.

Two templates turn a history into the model's prompt:

- ``DialogueTemplate`` for models trained on dialogue corpora: each turn is ``<|user|>text<|eot|>`` or
  ``<|bot|>text<|eot|>``; the prompt ends with ``<|bot|>``, and the answer ends at ``<|eot|>``.
- ``PlayTemplate`` for models trained on plain text such as Shakespeare: each turn is a speech, a
  speaker line then the text then a blank line (``Ham.\\nWho's there?\\n\\n``); the prompt ends with the
  bot's speaker line, and the answer ends where the next speech would begin (a blank line).

An answer's text is made one id at a time, as the ids are drawn, by ``core/stream.py``'s
``ReplyText`` (stop strings, ``<|unk|>`` hidden, no spaces at either end, the ids counted):
``Chatbot.reply_text`` pulls ids from a generator through it, and the server hands it each id as
it comes.

Tests: ``pytest tests/core/test_chat.py`` and ``tests/promises/test_properties.py`` (``ReplyText`` on any
ids).
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from minigpt2.core.config import CHAT_SAMPLE, SampleConfig
from minigpt2.core.stream import ReplyInfo, ReplyText
from minigpt2.core.tokenizer import BOT_ID, EOT_ID, USER_ID, CharTokenizer
from minigpt2.errors import UserError

# torch (and what imports it) is imported inside the methods that run the model: the templates and
# the prompt rules here are also used where torch is not needed yet.
if TYPE_CHECKING:
    import torch


class Prepared(NamedTuple):
    """The start of an answer (``Chatbot.prepare``): what ``generate_ids`` takes besides the model."""

    prompt: list[int]
    stop_ids: tuple[int, ...]
    min_new_tokens: int


@dataclass
class Turn:
    role: str  # "user" or "bot"
    text: str


@dataclass
class DialogueTemplate:
    """Turns marked with the tokenizer's special tokens (``data.encode_dialogue`` writes the
    training corpus with this template)."""

    name: str = "dialogue"

    def turn_ids(self, turn: Turn, tok: CharTokenizer) -> list[int]:
        return [USER_ID if turn.role == "user" else BOT_ID, *tok.encode(turn.text), EOT_ID]

    def reply_prefix(self, tok: CharTokenizer) -> list[int]:
        return [BOT_ID]

    stop_strings: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = (EOT_ID, USER_ID, BOT_ID)


@dataclass
class PlayTemplate:
    """Turns as speeches in a play: ``NAME.`` on its own line, the text, then a blank line."""

    name: str = "play"
    user_name: str = "Ham"  # Shakespeare's speech prefixes are abbreviated names ("Ham.", "Hor.")
    bot_name: str = "Hor"
    speaker_end: str = "."  # "." as in the shakespeare source; ":" for corpora written "NAME:"

    def _speaker(self, role: str) -> str:
        return (self.user_name if role == "user" else self.bot_name) + self.speaker_end + "\n"

    def turn_ids(self, turn: Turn, tok: CharTokenizer) -> list[int]:
        return tok.encode(self._speaker(turn.role) + turn.text.strip() + "\n\n")

    def reply_prefix(self, tok: CharTokenizer) -> list[int]:
        return tok.encode(self._speaker("bot"))

    stop_strings: tuple[str, ...] = ("\n\n",)
    stop_ids: tuple[int, ...] = (EOT_ID, USER_ID, BOT_ID)


Template = DialogueTemplate | PlayTemplate


def make_template(name: str, **options: Any) -> Template:
    """The template called ``name``; ``options`` (``user_name``, ``bot_name``, ``speaker_end``) set a
    play's speakers, each a string."""
    if name == "dialogue":
        return DialogueTemplate()
    if name == "play":
        given = {k: v for k, v in options.items() if v is not None}
        wrong = next((k for k, v in given.items() if not isinstance(v, str)), None)
        if wrong is not None:
            raise UserError(f"{wrong} must be a string, such as 'Ham', got {given[wrong]!r}")
        return PlayTemplate(**given)
    raise UserError(f"unknown chat template {name!r}; use dialogue or play")


def default_reply_room(block_size: int) -> int:
    """The ids of the window a chat leaves for the start of the answer, unless told otherwise: a
    quarter of it, at most 64, so the answer is not written into a window that must slide at once.
    ``Chatbot`` and the chat template of a Hugging Face export both trim by it."""
    return min(64, block_size // 4)


def prompt_budget(block_size: int, reply_room: int | None = None) -> int:
    """The most ids a chat prompt may take: the window less ``reply_room`` (``default_reply_room``
    when None), and never less than one id (the turn's opener must fit)."""
    room = default_reply_room(block_size) if reply_room is None else reply_room
    return max(1, block_size - room)


def build_prompt(history: list[Turn], template: Template, tok: CharTokenizer, budget: int) -> list[int]:
    """The prompt ids for the bot's next answer, at most ``budget`` long.

    Whole turns are dropped, oldest first, until the rest fits. Only when the newest message alone
    is too long is it cut, keeping its end (the part the answer should follow).
    """
    prefix = template.reply_prefix(tok)
    turns = [template.turn_ids(t, tok) for t in history]
    kept: list[list[int]] = []
    used = len(prefix)
    for ids in reversed(turns):
        if used + len(ids) > budget:
            if not kept:  # the newest message alone does not fit: keep its end
                kept.append(ids[len(ids) - (budget - used) :] if budget > used else [])
            break
        kept.append(ids)
        used += len(ids)
    return [i for ids in reversed(kept) for i in ids] + prefix


# The product's chatbot (loading runs, options by name, conversations in files, the notebook's
# views) extends this one; a script that asks the textbook's for those is told where they are.
MOVED = (
    "Chatbot.{name} is not the textbook's: use minigpt2.inference.Chatbot (it extends this one),"
    " or load_chatbot in the notebook"
)


class Chatbot:
    """A conversation with a trained model. History is a list of ``Turn``; answers are streamed."""

    def __init__(
        self,
        model: Any,
        tokenizer: CharTokenizer,
        template: Template | None = None,
        sample: SampleConfig | None = None,
        precision: Any = None,
        reply_room: int | None = None,
    ) -> None:
        from minigpt2.core.generate import make_generator

        self.model, self.tokenizer, self.precision = model, tokenizer, precision
        self.template: Template = template or DialogueTemplate()
        self.sample = sample or CHAT_SAMPLE
        block = model.config.block_size
        self.reply_room = reply_room if reply_room is not None else default_reply_room(block)
        self.history: list[Turn] = []
        self._warned: set[str] = set()
        self._generator: torch.Generator = make_generator(self.sample.seed)

    def new_unknown_chars(self, text: str) -> list[str]:
        """Characters of ``text`` the model never saw and the user has not been told about yet."""
        fresh = [c for c in self.tokenizer.unknown_chars(text) if c not in self._warned]
        self._warned.update(fresh)
        return fresh

    def stream(self, text: str) -> Iterator[str]:
        """Add the user's message, then yield the answer piece by piece. If the caller stops early
        (Ctrl-C, closing the generator), the partial answer still enters the history. A message that
        is not a string is refused before anything changes."""
        if not isinstance(text, str):
            raise UserError(f"a message must be a string, got {type(text).__name__}")
        return self._stream(text)

    def _stream(self, text: str) -> Iterator[str]:
        self.history.append(Turn("user", text))
        pieces: list[str] = []
        try:
            for piece in self.answer(self.history, generator=self._generator):
                pieces.append(piece)
                yield piece
        finally:
            self.history.append(Turn("bot", "".join(pieces).strip()))

    def prepare(self, history: Sequence[Turn]) -> Prepared:
        """What the model needs to write the bot's next turn after ``history``: the prompt (trimmed to
        leave ``reply_room`` in the window), the template's stop ids, and an answer of at least one id."""
        budget = prompt_budget(self.model.config.block_size, self.reply_room)
        prompt = build_prompt(list(history), self.template, self.tokenizer, budget)
        return Prepared(prompt, self.template.stop_ids, 1)

    def answer(
        self,
        history: Sequence[Turn],
        sample: SampleConfig | None = None,
        *,
        generator: torch.Generator | None = None,
        stop_strings: Sequence[str] = (),
        info: ReplyInfo | None = None,
    ) -> Generator[str, None, None]:
        """Yield the bot's next turn after ``history``, piece by piece, without touching
        ``self.history``: one ``Chatbot`` can answer many conversations at once.

        ``sample`` defaults to the bot's own, ``generator`` to a fresh one seeded from
        ``sample.seed``; ``stop_strings`` are added to the template's; ``info``, if given, is
        filled in as the answer streams. Spaces and line breaks at either end are left out, so
        the streamed answer is exactly the one the history keeps. It is ``prepare``, ``generate_ids``
        and ``reply_text`` (a server that draws ids its own way uses ``prepare`` and a
        ``new_reply_text``)."""
        from minigpt2.core.generate import make_generator
        from minigpt2.core.stream import generate_ids

        sample = sample or self.sample
        info = info if info is not None else ReplyInfo()
        prompt, stop_ids, min_new_tokens = self.prepare(history)
        info.prompt_tokens = len(prompt)
        ids = generate_ids(
            self.model, prompt, sample, stop_ids=stop_ids, precision=self.precision,
            generator=generator if generator is not None else make_generator(sample.seed),
            min_new_tokens=min_new_tokens,
        )  # fmt: skip
        yield from self.reply_text(ids, sample.max_new_tokens, info, stop_strings)

    def new_reply_text(self, max_new_tokens: int, info: ReplyInfo,
                       stop_strings: Sequence[str] = ()) -> ReplyText:  # fmt: skip
        """A ``ReplyText`` for one answer: it ends at the template's stop strings and ``stop_strings``."""
        stops = (*self.template.stop_strings, *stop_strings)
        return ReplyText(self.tokenizer, stops, max_new_tokens, info)

    def reply_text(self, ids: Iterable[int], max_new_tokens: int, info: ReplyInfo,
                   stop_strings: Sequence[str] = ()) -> Iterator[str]:  # fmt: skip
        """The text of an answer from its ids as they are drawn (at most ``max_new_tokens``), by
        ``ReplyText``'s rules: it ends at the template's stop strings and ``stop_strings``, without
        spaces at either end; ``info`` counts the ids and says why it ended. No id is asked for
        after a stop string, so the generator behind ``ids`` does no extra work."""
        text = self.new_reply_text(max_new_tokens, info, stop_strings)
        for new_id in ids:
            if piece := text.push(new_id):
                yield piece
            if text.ended:
                return
        if piece := text.finish():
            yield piece

    def reply(self, text: str) -> str:
        """The whole answer to ``text``."""
        return "".join(self.stream(text)).strip()

    def reset(self) -> None:
        self.history.clear()

    @classmethod
    def from_run(cls, *args: Any, **kwargs: Any) -> Chatbot:
        """Loading a run is the product's, not the textbook's: ``minigpt2.inference.Chatbot``."""
        raise AttributeError(MOVED.format(name="from_run"))

    def __getattr__(self, name: str) -> Any:
        if name in ("set_option", "save", "load", "next_char_probs"):
            raise AttributeError(MOVED.format(name=name))
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
