"""The notebook's user interface: what ``notebooks/chatbot.ipynb`` calls, cell by cell.

This module is to the notebook what the CLI (``minigpt2.cli``) is to the terminal: the one place
that shows things in Jupyter (streamed text, a live loss plot, a progress bar, a widget panel). The
work itself is done by the same library code the CLI uses (``recipes``, ``training``, ``core.chat``).
Bad input (an unknown option, a message that is not text) is a ``UserError`` with one clear line.
Tests: ``pytest tests/notebook/test_notebook.py`` (executes the notebook with a real Jupyter kernel).
"""

from __future__ import annotations

import base64
import html
import reprlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from minigpt2.core.chat import Turn
from minigpt2.errors import UserError
from minigpt2.inference.chatbot import Chatbot
from minigpt2.inference.options import OPTIONS, sample_with
from minigpt2.training import recipes
from minigpt2.training.metrics import Callback, ProgressBar, StepRecord, plot_losses, png_bytes

QUIT_WORDS = ("quit", "exit", "esci", "/quit")
_END: Any = object()  # the end of scripted messages (a None among them is a wrong message, not the end)


def describe_hardware(device: str = "auto", dtype: str = "auto") -> str:
    """One line: the device and the precision that training and chat will use, and why."""
    from minigpt2.hardware.precision import choose_device, choose_precision

    dev = choose_device(device)
    train, chat = choose_precision(dev, dtype), choose_precision(dev, dtype, inference=True)
    return (f"device: {dev}; training precision: {train.name} ({train.reason});"
            f" chat precision: {chat.name} ({chat.reason})")  # fmt: skip


class LivePlot(Callback):
    """Redraws train/val loss (best step marked) and the LR at every evaluation, with what the
    model says at that step beside the plot (``training/samples.py``), in one output area."""

    def __init__(self) -> None:
        self.records: list[StepRecord] = []
        self.samples: list[dict[str, Any]] = []
        self.best_step = -1
        self.handle: Any = None

    def on_step(self, record: StepRecord) -> None:
        self.records.append(record)

    def on_eval(self, step: int, val_loss: float, improved: bool) -> None:
        if improved:
            self.best_step = step
        self.draw()

    def on_samples(self, samples: list[dict[str, Any]]) -> None:
        self.samples = samples
        self.draw()

    def draw(self) -> None:
        from IPython.display import HTML, display

        png = base64.b64encode(png_bytes(plot_losses(self.records, self.best_step))).decode()
        said = "".join(
            f"<p><b>{html.escape(s['prompt'])}</b><br>{html.escape(s['text']) or '<i>(nothing)</i>'}</p>"
            for s in self.samples
        )
        heading = f"<b>what it says at step {self.samples[0]['step']}</b>" if self.samples else ""
        plot = f'<img src="data:image/png;base64,{png}" style="max-width:60%">'
        text = f'<div style="max-width:40%;font-family:monospace">{heading}{said}</div>'
        page = HTML(f'<div style="display:flex;gap:1em;align-items:flex-start">{plot}{text}</div>')
        if self.handle is None:
            self.handle = display(page, display_id=True)
        else:
            self.handle.update(page)


def ensure_chatbot(
    source: str, root: str | Path = ".", preset: str | None = None, overrides: dict[str, Any] | None = None
) -> Path:
    """The trained run for ``source`` under ``root``; trains it here, with a live plot, if missing
    (``source``'s recipe, or ``preset`` instead: ``recipes.ensure_chatbot``)."""
    from IPython.display import Image, display
    from tqdm.auto import tqdm

    data_dir, run_dir = recipes.default_paths(source, Path(root))
    if recipes.is_ready(run_dir):
        print(f"using the trained model in {run_dir}")
        if (run_dir / "loss.png").is_file():
            display(Image(filename=str(run_dir / "loss.png")))
        return run_dir
    print(f"training a model on {source} into {run_dir} ...")
    callbacks = [ProgressBar(tqdm, print), LivePlot()]
    return recipes.ensure_chatbot(source, data_dir, run_dir, preset, overrides, callbacks)


# What ``load_chatbot`` passes on to ``Chatbot.from_run``; every other keyword is a sampling option.
LOAD_OPTIONS = ("device", "dtype", "template", "engine", "decode_weights",
                "user_name", "bot_name", "speaker_end")  # fmt: skip


def load_chatbot(run: str | Path, seed: int | None = None, **options: Any) -> Chatbot:
    """The chatbot of a trained run; ``seed`` makes its answers repeatable.

    Keywords: the sampling options (``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``,
    ``max_new_tokens``), checked before the model is loaded, and how to load it (``device``,
    ``dtype``, ``template``, ``engine``, ``decode_weights``, ``user_name``, ``bot_name``,
    ``speaker_end``).
    """
    from minigpt2.core.config import CHAT_SAMPLE

    if not isinstance(run, str | Path):
        raise UserError(f"load_chatbot needs a run folder (a path such as 'runs/mine'), got {run!r}")
    unknown = [k for k in options if k not in LOAD_OPTIONS and k not in OPTIONS]
    if unknown:
        raise UserError(f"load_chatbot has no option {unknown[0]!r}; sampling options:"
                        f" {', '.join(OPTIONS)}; loading options: {', '.join(LOAD_OPTIONS)}")  # fmt: skip
    sampling = {k: options.pop(k) for k in list(options) if k in OPTIONS}
    sample = sample_with(CHAT_SAMPLE, {"seed": seed, **sampling})
    bot = Chatbot.from_run(run, sample=sample, **options)
    print(f"loaded {run}: {bot.model.num_params():,} parameters, {bot.template.name} template")
    return bot


def show_reply(bot: Chatbot, message: str) -> str:
    """Answer ``message``, printing the reply as it is generated. Returns the whole reply."""
    if not isinstance(message, str):
        raise UserError(f"show_reply needs a message as a string, got {reprlib.repr(message)}")
    unknown = bot.new_unknown_chars(message)
    if unknown:
        print(f"(the model never saw {' '.join(unknown[:10])}; they become <|unk|>)")
    print("bot> ", end="", flush=True)
    pieces = []
    for piece in bot.stream(message):
        pieces.append(piece)
        print(piece, end="", flush=True)
    print()
    return "".join(pieces).strip()


def chat_loop(
    bot: Chatbot, messages: Iterable[str] | str | None = None, ask: Callable[[str], str] = input
) -> list[tuple[str, str]]:
    """Answer message after message until ``quit``/``esci`` or the kernel is interrupted.

    ``messages`` (a list, or one message as a string) replaces typing, for running the notebook
    unattended; a message that is not a string is refused with a ``UserError``. Returns the
    (message, reply) pairs of this loop.
    """
    if isinstance(messages, str):  # one message, not one message per character
        messages = [messages]
    if messages is not None and not isinstance(messages, Iterable):
        raise UserError(f"chat_loop: each message must be a string, got {reprlib.repr(messages)}")
    exchanges: list[tuple[str, str]] = []
    source = iter(messages) if messages is not None else None
    while True:
        try:
            message = ask("you> ") if source is None else next(source, _END)
        except (KeyboardInterrupt, EOFError):
            break
        if message is _END:
            break
        if not isinstance(message, str):
            raise UserError(f"chat_loop: each message must be a string, got {reprlib.repr(message)}")
        if source is not None:
            print(f"you> {message}")
        if message.strip().lower() in QUIT_WORDS:
            break
        if not message.strip():
            continue
        try:
            exchanges.append((message, show_reply(bot, message)))
        except KeyboardInterrupt:
            print(" [stopped]")
            break
    print("(chat ended)")
    return exchanges


def next_char_chart(bot: Chatbot, k: int = 12) -> Any:
    """A bar chart of the likeliest first characters of the last answer."""
    from IPython.display import Image, display
    from matplotlib.figure import Figure

    probs = bot.next_char_probs(k)
    fig = Figure(figsize=(7, 3))
    ax = fig.subplots()
    ax.bar([c for c, _ in probs], [p for _, p in probs], color="tab:blue")
    ax.set_ylabel("probability")
    ax.set_title("what the model could have said first (next-character probabilities)")
    fig.tight_layout()
    display(Image(data=png_bytes(fig)))
    return probs


HEADS_NOTE = (
    "Each head learns its own way of looking back. Common ones in character models: a head that looks"
    " at the previous character (a bright diagonal just left of the main one), one that looks at the"
    " start of the current word (after the last space), and one that looks back at the user's message"
    " (the block of columns after U:). Rows are the characters the bot wrote; columns, what it could see."
)


def attention_heatmaps(bot: Chatbot, layer: int = -1) -> Any:
    """One heatmap per head of ``layer``: where the model looked while it wrote its last answer."""
    from IPython.display import Image, display
    from matplotlib.figure import Figure

    from minigpt2.notebook.attention_maps import answer_attention

    amap = answer_attention(bot, layer)
    nh, A, K = amap.weights.shape
    fig = Figure(figsize=(min(16, 2 + K * 0.16), (1 + A * 0.16) * nh))
    for h, ax in enumerate(fig.subplots(nh, 1, squeeze=False)[:, 0]):
        ax.imshow(amap.weights[h].numpy(), cmap="Blues", aspect="auto", vmin=0.0)
        ax.set_title(f"layer {amap.layer}, head {h}", fontsize=9)
        ax.set_xticks(range(K), amap.cols, fontsize=6)
        ax.set_yticks(range(A), amap.rows, fontsize=6)
    fig.tight_layout()
    display(Image(data=png_bytes(fig)))
    print(HEADS_NOTE)
    return amap


def compare_sampling(
    bot: Chatbot,
    message: str,
    temperatures: Iterable[float] = (0.3, 0.7, 1.2),
    top_ks: Iterable[int] = (1, 5, 40),
) -> list[tuple[str, str]]:
    """The same message answered at several temperatures and top-k values, side by side (same seed,
    the bot's history as it is, which stays unchanged). Returns (setting, answer) pairs."""
    from IPython.display import HTML, display

    if not isinstance(message, str) or not message.strip():
        raise UserError("compare_sampling needs a message to answer, as a non-empty string")
    for name, values in (("temperatures", temperatures), ("top_ks", top_ks)):
        if isinstance(values, str | bytes) or not isinstance(values, Iterable):
            raise UserError(f"compare_sampling: {name} must be a list of values, such as [1, 5, 40],"
                            f" got {reprlib.repr(values)}")  # fmt: skip
    history = [*bot.history, Turn("user", message)]
    settings = [("temperature", t) for t in temperatures] + [("top_k", k) for k in top_ks]
    rows = []
    for name, value in settings:
        sample = sample_with(bot.sample, {name: value, "seed": bot.sample.seed or 0})
        rows.append((f"{name} {value}", "".join(bot.answer(history, sample))))
    cells = "".join(f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    display(HTML(f"<p>you: {html.escape(message)}</p><table>{cells}</table>"))
    return rows


class ChatPanel:
    """An ipywidgets chat: text box (Enter sends), Send, Reset, temperature and top-k sliders, and
    a transcript that fills in as the answer streams. ``send(text)`` does what the button does."""

    def __init__(self, bot: Chatbot) -> None:
        import ipywidgets as w

        self.bot = bot
        self.text = w.Text(placeholder="type a message, then Enter", continuous_update=False,
                           layout=w.Layout(width="60%"))  # fmt: skip
        self.send_button = w.Button(description="Send", button_style="primary")
        self.reset_button = w.Button(description="Reset")
        self.temperature = w.FloatSlider(value=bot.sample.temperature, min=0.0, max=2.0, step=0.05,
                                         description="temperature")  # fmt: skip
        self.top_k = w.IntSlider(value=bot.sample.top_k, min=0, max=bot.tokenizer.vocab_size,
                                 description="top-k")  # fmt: skip
        self.transcript = w.HTML(value="")
        self.send_button.on_click(lambda _: self.send(self.text.value))
        self.reset_button.on_click(lambda _: self.reset())
        self.text.observe(lambda change: self.send(change["new"]), names="value")
        self.widget = w.VBox([self.transcript, w.HBox([self.text, self.send_button, self.reset_button]),
                              w.HBox([self.temperature, self.top_k])])  # fmt: skip
        self._busy = False

    def send(self, text: str) -> str:
        if self._busy or not text.strip():
            return ""
        self._busy = True
        try:
            self.bot.set_option("temperature", str(self.temperature.value))
            self.bot.set_option("top_k", str(self.top_k.value))
            self.text.value = ""
            reply = ""
            for piece in self.bot.stream(text):
                reply += piece
                self._render(partial=reply)
            self._render()
            return reply.strip()
        finally:
            self._busy = False

    def reset(self) -> None:
        self.bot.reset()
        self._render()

    def _render(self, partial: str | None = None) -> None:
        rows = [
            f"<b>{'you' if t.role == 'user' else 'bot'}:</b> {html.escape(t.text)}" for t in self.bot.history
        ]
        if partial is not None:
            rows.append(f"<b>bot:</b> {html.escape(partial)}▌")
        self.transcript.value = "<br>".join(rows)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
