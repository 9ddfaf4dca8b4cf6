"""The Hugging Face tokenizer of an export: what ``AutoTokenizer.from_pretrained(EXPORT)`` reads.

Built from a ``CharTokenizer`` so that ``transformers`` alone encodes, decodes and formats chats as
minigpt2 does:

- ``tokenizer.json``, in the format of the ``tokenizers`` library, written here as plain JSON (so
  exporting needs neither ``tokenizers`` nor ``transformers``): a BPE model with one entry per token and
  no merges, so each character is one token and any other is ``<|unk|>``; our four special tokens as
  added special tokens at ids 0-3; a normaliser that does what ``CharTokenizer.encode`` does (CRLF to
  LF, NFC, then the ``NORMALISE`` rules this vocabulary activates); a decoder that joins tokens as is.
- ``tokenizer_config.json`` and ``special_tokens_map.json``, with a Jinja chat template that renders
  a conversation as ``chat.build_prompt`` does (dialogue or play), keeping the newest whole turns that
  fit in the window as ``Chatbot`` does. System messages are left out, as ``minigpt2 serve`` does.
  Jinja counts characters as typed and ``build_prompt`` ids after normalising: where a message
  changes length under normalisation (combining accents, ``\r``, a rule that makes one character
  several) the two may keep different turns, or cut a too-long newest message elsewhere; otherwise
  they are the same ids.
- ``read_vocab``: the vocabulary back from a ``tokenizer.json``, for ``import-hf``.

Special tokens. A ``transformers`` tokenizer reads the spelling of a special token in text as that
token (``tok("<|user|>")`` is one id) unless called with ``split_special_tokens=True``; it cannot be
set to do that by default, because ``apply_chat_template`` tokenizes its rendered text the same way.
So the chat template escapes ``<|`` in messages with a character the normaliser deletes: ``\\r``,
which minigpt2 deletes too when the corpus has none, and then a chat encodes exactly as minigpt2
encodes it; in a corpus with lone ``\\r``, U+FDD0 (a noncharacter, which this tokenizer then
deletes where minigpt2 reads ``<|unk|>``). Either way a message cannot forge a turn marker.

Tests: ``pytest tests/exports/test_hf.py``: generated texts and conversations against ``CharTokenizer`` and
``build_prompt`` in process, then ``transformers`` alone (a process that cannot import minigpt2)
loading an export: tokenizer, chat template, ``pipeline`` and ``generate``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from minigpt2.core.chat import PlayTemplate, make_template, prompt_budget
from minigpt2.core.tokenizer import BOT, EOT, NORMALISE, SPECIAL_TOKENS, UNK, USER, CharTokenizer
from minigpt2.errors import CheckpointError
from minigpt2.storage.fileio import read_small_text

TOKENIZER_FILE = "tokenizer.json"
NONCHARACTERS = "\ufdd0\ufdd1\ufdd2\ufdd3"


def active_rules(tok: CharTokenizer) -> dict[str, str]:
    """The ``NORMALISE`` rules ``tok.encode`` applies: for characters it lacks, to characters it has."""
    known = set(tok.chars)
    return {c: r for c, r in NORMALISE.items() if c not in known and all(x in known for x in r)}


def escape_char(tok: CharTokenizer) -> str:
    """What the chat template puts inside ``<|`` in a message; the normaliser deletes it."""
    if "\r" in active_rules(tok):
        return "\r"
    return next(c for c in NONCHARACTERS if c not in tok.chars)


def tokenizer_files(tok: CharTokenizer, block_size: int, template: str) -> dict[str, bytes]:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` for a model with
    this vocabulary, context window and chat template (``dialogue`` or ``play``)."""
    special: dict[str, Any] = {"unk_token": UNK, "bos_token": EOT, "eos_token": EOT, "pad_token": EOT,
               "additional_special_tokens": [USER, BOT]}  # fmt: skip
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # it would drop the space before "." and ","
        "split_special_tokens": False,  # True would also split the chat template's own markers
        "padding_side": "left",  # a decoder-only model continues the right end of a padded batch
        "truncation_side": "left",  # a prompt too long for the window keeps its end, as minigpt2 does
        "chat_template": chat_template(tok, block_size, template),
    }
    docs = {TOKENIZER_FILE: tokenizer_json(tok), "tokenizer_config.json": config,
            "special_tokens_map.json": special}  # fmt: skip
    return {name: json.dumps(doc, indent=1, ensure_ascii=False).encode() for name, doc in docs.items()}


def tokenizer_json(tok: CharTokenizer) -> dict[str, Any]:
    def replace(pattern: str, content: str) -> dict[str, Any]:
        return {"type": "Replace", "pattern": {"String": pattern}, "content": content}

    # Applied one after another, the rules act as CharTokenizer's per-character lookup: a rule's
    # output holds only known characters, and a rule's pattern is an unknown one.
    normalizers = [replace("\r\n", "\n"), {"type": "NFC"}]
    normalizers += [replace(c, r) for c, r in active_rules(tok).items()]
    if escape_char(tok) != "\r":
        normalizers.append(replace(escape_char(tok), ""))
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in enumerate(SPECIAL_TOKENS)]  # fmt: skip
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        # No merges: every character stays a token of its own. The special tokens' spellings are in
        # the vocabulary only to give them their ids; text never produces them (ignore_merges false).
        "model": {"type": "BPE", "dropout": None, "unk_token": UNK, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": {t: i for i, t in enumerate(tok.tokens)}, "merges": []},
    }  # fmt: skip


def _lit(s: str) -> str:
    """``s`` as a Jinja string literal, everything but printable ASCII escaped."""
    return "'" + s.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"


def _cat(*parts: str) -> str:
    """Jinja concatenation of the non-empty ``parts``."""
    return " ~ ".join(p for p in parts if p)


def chat_template(tok: CharTokenizer, block_size: int, template: str) -> str:
    """Jinja rendering ``build_prompt`` for ``messages`` (roles user and assistant; others skipped).

    Turns are taken newest first while they fit in ``chat.prompt_budget(block_size)``; when the
    newest alone does not, its end is kept. A text's cost is its length in characters corrected for
    the rules that change a length (``—`` to ``--``, CRLF): exact, except that text NFC composes is
    counted high and a cut that would split an expanded character keeps one token less: never more
    than fits."""
    tmpl = make_template(template)
    rules = active_rules(tok)
    deltas = {c: len(r) - 1 for c, r in rules.items() if len(r) != 1}
    if "\r" not in rules:  # "\r" is known: CRLF still reads as LF
        deltas["\r\n"] = -1

    def cost(v: str) -> str:
        return f"({v} | length" + "".join(f" + {v}.count({_lit(c)}) * {d}" for c, d in deltas.items()) + ")"

    esc = f"replace('<|', {_lit('<' + escape_char(tok) + '|')})"
    budget = prompt_budget(block_size)  # Chatbot's default trimming, as `minigpt2 chat` does
    if isinstance(tmpl, PlayTemplate):  # a turn is all text: "Ham.\ntext\n\n"
        user, bot = (_lit(n + tmpl.speaker_end + "\n") for n in (tmpl.user_name, tmpl.bot_name))
        turn = f"({user} if m.role == 'user' else {bot}) ~ c | trim ~ '\\n\\n'"
        head, tail, marks, opener = "", "", 0, bot
    else:  # "<|user|>text<|eot|>": two marker tokens around the text
        turn = "c"
        head, tail, marks, opener = (
            "('<|user|>' if m.role == 'user' else '<|bot|>')",
            "'<|eot|>'",
            2,
            "'<|bot|>'",
        )
    lines = f"""
        {{%- set ns = namespace(out='', used={len(tmpl.reply_prefix(tok))} if add_generation_prompt else 0,
                                done=false) -%}}
        {{%- for m in messages | reverse if m.role in ['user', 'assistant'] -%}}
          {{%- if not ns.done -%}}
            {{%- set c = m.content | default('', true) -%}}
            {{%- if c is not string -%}}
              {{%- set c = c | selectattr('type', 'equalto', 'text') | map(attribute='text') | join -%}}
            {{%- endif -%}}
            {{%- set t = {turn} -%}}
            {{%- set n = {marks} + {cost("t")} -%}}
            {{%- if ns.used + n <= {budget} -%}}
              {{%- set ns.out = {_cat(head, f"t | {esc}", tail, "ns.out")} -%}}
              {{%- set ns.used = ns.used + n -%}}
            {{%- else -%}}
              {{%- set k = {budget} - ns.used - {marks // 2} -%}}
              {{%- if ns.out == '' and k >= 0 -%}}
                {{%- set s = t[-k:] if k > 0 else '' -%}}
                {{%- set over = {cost("s")} - s | length -%}}
                {{%- if over > 0 -%}}{{%- set s = t[-(k - over):] if k > over else '' -%}}{{%- endif -%}}
                {{%- set ns.out = {_cat(f"s | {esc}", tail)} -%}}
              {{%- endif -%}}
              {{%- set ns.done = true -%}}
            {{%- endif -%}}
          {{%- endif -%}}
        {{%- endfor -%}}
        {{{{- ns.out -}}}}
        {{%- if add_generation_prompt -%}}{{{{- {opener} -}}}}{{%- endif -%}}
    """
    # Every tag trims the whitespace around it, so the layout above renders as nothing.
    return " ".join(line.strip() for line in lines.strip().splitlines())


def read_vocab(hf_dir: Path) -> CharTokenizer | None:
    """The character vocabulary of ``hf_dir/tokenizer.json``; None if there is none.

    It must be a vocabulary without merges whose ids 0-3 are our special tokens and whose other
    tokens are single characters: anything else is one ``CheckpointError``."""
    path = hf_dir / TOKENIZER_FILE
    if not path.exists():
        return None
    try:
        doc = json.loads(read_small_text(path))
        model = doc["model"]
        vocab = model["vocab"]
        by_id = sorted((i, t) for t, i in vocab.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path} cannot be read as a tokenizer ({err})") from None
    tokens = [t for _, t in by_id]
    if (
        model.get("type") not in ("BPE", "WordLevel")
        or model.get("merges")
        or [i for i, _ in by_id] != list(range(len(by_id)))
        or tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS
    ):
        raise CheckpointError(
            f"{path} is not a character vocabulary with {', '.join(SPECIAL_TOKENS)} at ids 0-3"
        )
    try:
        return CharTokenizer(tokens[len(SPECIAL_TOKENS) :])
    except ValueError as err:
        raise CheckpointError(f"{path} is not a character vocabulary: {err}") from None
