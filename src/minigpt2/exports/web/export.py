"""Write a run as one web page that chats in the browser: ``export_web``.

The page is a single HTML file that asks nothing of any network: it holds the weights (base64),
the vocabulary with the tokenizer's normalisation table, the chat template with its speaker names,
the sampling defaults (``CHAT_SAMPLE``), the model's name, parameter count and best val loss, and
a JavaScript GPT-2 (``model.js`` beside this file, written to be read next to ``core/model.py``)
that runs in a Web Worker built from a Blob of the page's own text, so it works opened as
``file://``. It answers as ``minigpt2 chat`` does: the same turn template, history trimmed by whole
turns, stop ids and strings, a window that slides past the context, greedy answers identical.

Weights, ``dtype``:

- ``fp32`` (default): 4 bytes a parameter, 5.33 in base64 (the `chat` preset's 3.2M: a 17 MB page);
  the page computes what PyTorch computes in fp32: greedy answers agree character for character.
- ``fp16``: half that (2.67 bytes a parameter: 8.6 MB for `chat`); each weight keeps 11 significant
  bits (a relative error up to 2^-11, 0.05%) and becomes fp32 again on load. The logits move by
  about 0.1% of their spread (under 1% at worst), so greedy answers follow fp32's until two
  candidates come that close. Measured: the `chat` preset trained for 4 minutes (val loss 0.867)
  gave 20 of 20 greedy answers (1,545 characters) identical to fp32's; the random model of
  ``tests/exports/test_web_export.py``, 5 of 5. Speed is the same (the page computes in fp32 either way).

Size limit: ``MAX_PARAMS``, 30M parameters, refused before any weight is read. Measured in headless
Chromium 150 on one core of a 2-core AMD EPYC (``benchmarks/web_chat.py --load-sizes``: page size,
time from opening the file to the model being ready, characters/s of a 50-character answer):

    parameters   fp32 page   open    fp16 page   open    characters/s
    3.2M          17 MB      0.4 s     9 MB      0.4 s   105
    10.8M         58 MB      0.8 s    29 MB      0.6 s    43-49
    25.4M        135 MB      1.5 s    68 MB      1.1 s    22-25
    59.5M        317 MB      3.4 s   159 MB      2.1 s     9-11
    85.9M        458 MB      4.0 s   229 MB      2.3 s     9

Every size opens, but the speed falls with the parameters (the page runs on one core, in plain
JavaScript): up to about 30M it streams at least as fast as one reads (20-25 characters/s); past it,
answers crawl, and the page grows to hundreds of MB, which the tab holds more than once while
loading (the page's text, the worker's copy, the decoded weights). Near 100M parameters in fp32
(a 537 MB page) it could not open at all: the weights' text would pass V8's longest string
(2^29 - 24 characters).

The page's parts are files beside this one (``page.html``, ``page.js``; ``chat_ui.js``, the screen it
shares with the served web chat, whose stylesheet and markup it takes too; the worker's
``model.js``, ``tokenizer.js``, ``generate.js``, ``chat.js``, ``worker.js``), inlined here.
Tests: ``pytest tests/exports/test_web_export.py``; speed: ``python benchmarks/web_chat.py``.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt2.core.chat import Chatbot, make_template
from minigpt2.core.model import GPT
from minigpt2.core.tokenizer import NORMALISE
from minigpt2.errors import UserError, WriteError
from minigpt2.storage import checkpoint, outdirs
from minigpt2.storage.fileio import atomic_write_bytes

DTYPES = {"fp32": "<f4", "fp16": "<f2"}  # little-endian, as every browser's typed arrays
MAX_PARAMS = 30_000_000  # the most a page streams at reading speed (the module's docstring)
MARKER = b'<meta name="generator" content="minigpt2 web export">'  # in page.html's head
WORKER_PARTS = ("model.js", "tokenizer.js", "generate.js", "chat.js", "worker.js")
PAGE_OVERHEAD = 64_000  # bytes of HTML, JavaScript and vocabulary around the weights, about


@dataclass(frozen=True)
class WebExport:
    """What ``export_web`` wrote."""

    path: Path
    size_bytes: int
    dtype: str
    n_params: int
    template: str  # "dialogue" or "play"
    name: str  # the model's name in the page (the run folder's)

    def summary(self) -> str:
        """One line for the command line."""
        return (
            f"wrote {self.path} ({self.size_bytes / 1e6:.1f} MB: {self.name}, {self.n_params:,} parameters,"
            f" {self.dtype}, {self.template} template); open it in a browser, no server or network needed"
        )


def export_web(run: Path, out: Path, dtype: str = "fp32", force: bool = False) -> WebExport:
    """Write ``run``'s best (or given) checkpoint as the single HTML file ``out``, atomically.

    ``out`` may be new or an earlier page of this export (replaced); any other existing file only
    with ``force``; never a folder, nor anything inside a run. A model of more than ``MAX_PARAMS``
    parameters is refused before its weights are read."""
    if dtype not in DTYPES:
        raise UserError(f"the web page's weights are fp32 or fp16, got {dtype!r}")
    out = Path(out).expanduser()
    check_target(out, force)
    ckpt = checkpoint.load(Path(run))
    with torch.device("meta"):  # the shape alone: a model too big for a page is never allocated
        n_params = GPT(ckpt.model_config).num_params()
    check_size(n_params, dtype, Path(run))
    model = ckpt.build_model()
    template = make_template(ckpt.meta.get("chat_template") or "dialogue")
    bot = Chatbot(model, ckpt.tokenizer, template)  # its reply room and sampling: `minigpt2 chat`'s
    manifest, weights = encode_weights(model, dtype, ckpt.path)
    name = model_name(ckpt.path)
    data = {
        "name": name,
        "n_params": n_params,
        "val_loss": best_val_loss(ckpt.meta),
        "step": ckpt.meta.get("step"),
        "dtype": dtype,
        "config": {
            k: getattr(model.config, k) for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
        },
        "tokenizer": {"chars": ckpt.tokenizer.chars, "normalise": NORMALISE},
        "template": dataclasses.asdict(template),
        "reply_room": bot.reply_room,
        "sample": dataclasses.asdict(bot.sample),
        "tensors": manifest,
    }
    page = render_page(data, base64.b64encode(weights).decode("ascii"))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, page)
    except OSError as err:
        raise WriteError(
            f"cannot write the page {out}: {err.strerror or err}; free some space or choose another --out"
        ) from None
    return WebExport(out, len(page), dtype, n_params, template.name, name)


def check_target(out: Path, force: bool) -> None:
    """Refuse, in one line, to write over a run, into one (or into a data folder or an export), over
    a folder, a device, a FIFO or a socket (even with ``force``), or over a file that is not an
    earlier page of this export (unless ``force``)."""
    kind = outdirs.kind_of(out) if out.is_dir() else None
    if kind in ("run", "checkpoint"):
        raise UserError(f"{out} is {outdirs.DESCRIPTIONS[kind]}; write the page to a file outside it")
    if out.is_dir():
        raise UserError(f"{out} is a folder; give the page a file name, such as {out / 'chatbot.html'}")
    outdirs.check_file_target(out, f"cannot write the page {out}")
    if out.exists() and not force and not is_web_export(out):
        raise UserError(
            f"{out} exists and is not a page written by this export; choose another name, or add"
            " --force to replace it"
        )


def is_web_export(path: Path) -> bool:
    """Whether ``path`` is a page written by ``export_web`` (its head carries ``MARKER``)."""
    try:
        with open(path, "rb") as f:
            return MARKER in f.read(4096)
    except OSError:
        return False


def page_bytes(n_params: int, dtype: str) -> int:
    """The page's size: the weights in base64 (4 characters per 3 bytes) and what surrounds them."""
    raw = n_params * np.dtype(DTYPES[dtype]).itemsize
    return 4 * math.ceil(raw / 3) + PAGE_OVERHEAD


def check_size(n_params: int, dtype: str, run: Path) -> None:
    """Refuse, in one line, a model of more than ``MAX_PARAMS`` parameters."""
    if n_params > MAX_PARAMS:
        size_mb = page_bytes(n_params, dtype) / 1e6
        raise UserError(
            f"{run} is too big for a web page: {n_params:,} parameters (a {size_mb:,.1f} MB page in {dtype}),"
            f" over the {MAX_PARAMS / 1e6:g}M a browser runs at reading speed"
        )


def encode_weights(model: GPT, dtype: str, ckpt_dir: Path) -> tuple[list[dict[str, Any]], bytes]:
    """The weights as one little-endian block, and where each tensor lies in it (by its PyTorch
    name and shape). The tied LM head is the token embedding: it is stored once, as in checkpoints."""
    manifest, chunks, offset = [], [], 0
    for name, tensor in model.state_dict().items():
        if name == checkpoint.TIED:
            continue
        values = tensor.detach().float().cpu().numpy().astype(DTYPES[dtype])
        if not np.isfinite(values).all():
            raise UserError(
                f"{ckpt_dir}: {name} holds weights beyond {dtype}'s range; export it with --dtype fp32"
            )
        manifest.append({"name": name, "shape": list(values.shape), "offset": offset})
        chunks.append(values.tobytes())
        offset += values.nbytes  # a multiple of the item size: every view in the page is aligned
    return manifest, b"".join(chunks)


def render_page(data: dict[str, Any], weights_b64: str) -> bytes:
    """page.html with its placeholders filled: the served page's style and markup, the model's
    description, the worker's code, the weights, the shared screen and the page's own code. Each
    is scanned once, so no inserted text is read as one."""
    files = resources.files("minigpt2.exports.web")
    worker = "\n".join(files.joinpath(name).read_text(encoding="utf-8") for name in WORKER_PARTS)
    page_code, chat_ui = (files.joinpath(f).read_text(encoding="utf-8") for f in ("page.js", "chat_ui.js"))
    for code in (worker, page_code, chat_ui):
        # Inside <script>, these would end the element (or change how the parser reads it).
        assert not re.search(r"</script|<!--", code, re.IGNORECASE), "a script part holds </script or <!--"
    parts = {
        **served_parts(),
        "CHAT_UI": chat_ui,
        "TITLE": html.escape(data["name"]),
        # "<" only occurs inside JSON strings, where \u003c means the same and cannot end the element.
        "MODEL_DATA": json.dumps(data, ensure_ascii=False).replace("<", "\\u003c"),
        "WORKER_CODE": worker,
        "WEIGHTS": weights_b64,
        "PAGE_CODE": page_code,
    }
    template = files.joinpath("page.html").read_text(encoding="utf-8")
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: parts[m.group(1)], template).encode("utf-8")


def served_parts() -> dict[str, str]:
    """The served web chat's ``<style>`` element (STYLE) and its markup (MARKUP: the header,
    transcript and composer, up to its scripts), so that both pages look and work alike with one
    copy of each. Read as a file of the package: importing ``minigpt2.serve`` would need the
    server's dependencies, which exporting does not."""
    served = resources.files("minigpt2").joinpath("serve/static/chat.html").read_text(encoding="utf-8")
    head = served.index("</head>")  # (the comment at the top may name tags: look past it)
    style = served[served.index("<style>") : served.index("</style>") + len("</style>")]
    body = served.index(">", served.index("<body", head)) + 1
    markup = served[body : served.index("<script", body)].strip()
    assert markup.startswith("<header>") and markup.endswith("</form>"), "chat.html's body is not as expected"
    return {"STYLE": style, "MARKUP": markup}


def model_name(ckpt_dir: Path) -> str:
    """The run's folder name (``minigpt2 serve``'s model id), for RUN/best as for a checkpoint."""
    path = ckpt_dir.resolve()
    return path.parent.name if path.name.removesuffix(".old") in ("best", "last") else path.name


def best_val_loss(meta: dict[str, Any]) -> float | None:
    for key in ("best_val_loss", "val_loss"):
        value = meta.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None
