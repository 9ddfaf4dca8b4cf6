"""The notebook's user interface: what ``notebooks/chatbot.ipynb`` calls, cell by cell.

This module is to the notebook what the CLI (``minigpt2.cli``) is to the terminal: the one place
that shows things in Jupyter (streamed text, a live loss plot, a progress bar, a widget panel). The
work itself is done by the same library code the CLI uses (``recipes``, ``training``, ``core.chat``).
Tests: ``pytest tests/test_notebook.py`` (executes the notebook with a real Jupyter kernel).
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from minigpt2 import recipes
from minigpt2.core.chat import Chatbot
from minigpt2.training.metrics import Callback, ProgressBar, StepRecord, plot_losses, png_bytes

QUIT_WORDS = ("quit", "exit", "esci", "/quit")


def describe_hardware(device: str = "auto", dtype: str = "auto") -> str:
    """One line: the device and the precision that training and chat will use, and why."""
    from minigpt2.precision import choose_device, choose_precision

    dev = choose_device(device)
    train, chat = choose_precision(dev, dtype), choose_precision(dev, dtype, inference=True)
    return (f"device: {dev}; training precision: {train.name} ({train.reason});"
            f" chat precision: {chat.name} ({chat.reason})")  # fmt: skip


class LivePlot(Callback):
    """Redraws train/val loss (best step marked) and the LR in one output area at every evaluation."""

    def __init__(self) -> None:
        self.records: list[StepRecord] = []
        self.best_step = -1
        self.handle: Any = None

    def on_step(self, record: StepRecord) -> None:
        self.records.append(record)

    def on_eval(self, step: int, val_loss: float, improved: bool) -> None:
        if improved:
            self.best_step = step
        self.draw()

    def draw(self) -> None:
        from IPython.display import Image, display

        image = Image(data=png_bytes(plot_losses(self.records, self.best_step)))
        if self.handle is None:
            self.handle = display(image, display_id=True)
        else:
            self.handle.update(image)


def ensure_chatbot(
    source: str, root: str | Path = ".", preset: str = "chat", overrides: dict[str, Any] | None = None
) -> Path:
    """The trained run for ``source`` under ``root``; trains it here, with a live plot, if missing."""
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


def load_chatbot(run: str | Path, seed: int | None = None, **options: Any) -> Chatbot:
    """The chatbot of a trained run; ``seed`` makes its answers repeatable."""
    from minigpt2.core.config import CHAT_SAMPLE

    sample = dataclasses.replace(CHAT_SAMPLE, seed=seed)
    bot = Chatbot.from_run(run, sample=sample, **options)
    print(f"loaded {run}: {bot.model.num_params():,} parameters, {bot.template.name} template")
    return bot


def show_reply(bot: Chatbot, message: str) -> str:
    """Answer ``message``, printing the reply as it is generated. Returns the whole reply."""
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
    bot: Chatbot, messages: Iterable[str] | None = None, ask: Callable[[str], str] = input
) -> list[tuple[str, str]]:
    """Answer message after message until ``quit``/``esci`` or the kernel is interrupted.

    ``messages`` (a list) replaces typing, for running the notebook unattended. Returns the
    (message, reply) pairs of this loop.
    """
    exchanges: list[tuple[str, str]] = []
    source = iter(messages) if messages is not None else None
    while True:
        try:
            if source is None:
                message = ask("you> ")
            else:
                scripted = next(source, None)
                if scripted is None:
                    break
                message = scripted
                print(f"you> {message}")
        except (KeyboardInterrupt, EOFError):
            break
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
