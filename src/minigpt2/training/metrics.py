"""What training reports: the per-step record, the callback interface, ``metrics.csv`` and ``loss.png``.

The training loop never prints. It hands a ``StepRecord`` to each ``Callback`` after every optimizer
step and a message for every notable event; the CLI turns these into a tqdm bar and log lines, the
notebook into a live plot. ``MetricsFile`` and ``plot_losses`` write the run's files.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from minigpt2.storage.fileio import atomic_write_text


@dataclass
class StepRecord:
    """One optimizer step; ``val_loss`` is NaN except at evaluation steps."""

    step: int  # optimizer steps done (1-based)
    train_loss: float
    val_loss: float
    lr: float
    grad_norm: float  # global gradient norm before clipping
    clipped: bool  # whether clipping scaled the gradient down
    tokens_per_s: float
    elapsed_s: float


COLUMNS = [f.name for f in fields(StepRecord)]


class Callback:
    """Override what you need. ``on_start`` receives the total number of steps and the first one."""

    def on_start(self, total_steps: int, first_step: int) -> None: ...

    def on_total(self, total_steps: int) -> None:
        """The steps the run now expects to take: with a time budget, those that fit in it at the
        speed so far (called after every step); without one, ``max_iters`` as ``on_start`` said."""

    def on_step(self, record: StepRecord) -> None: ...

    def on_eval(self, step: int, val_loss: float, improved: bool) -> None: ...

    def on_message(self, message: str) -> None: ...

    def on_samples(self, samples: list[dict[str, Any]]) -> None:
        """What the model says now (``training/samples.py``): step, val_loss, prompt, text each."""

    def on_end(self, summary: dict[str, Any]) -> None: ...


def _row(record: StepRecord) -> list[Any]:
    values = asdict(record)
    values["val_loss"] = "" if math.isnan(record.val_loss) else f"{record.val_loss:.6f}"
    values["clipped"] = int(record.clipped)
    return [values[c] for c in COLUMNS]


def read_records(path: Path, until_step: int) -> list[StepRecord]:
    """The rows of a ``metrics.csv`` up to ``until_step``, as records; none if it is missing or
    unreadable (the metrics are a record of the run, not what it resumes from)."""
    try:
        rows = read_metrics(path)
        fixed: list[dict[str, Any]] = [
            {**r, "step": int(r["step"]), "clipped": r["clipped"] == 1} for r in rows
        ]
        records = [StepRecord(**r) for r in fixed]
    except (OSError, ValueError, KeyError, TypeError, csv.Error):
        return []
    return [r for r in records if r.step <= until_step]


class MetricsFile:
    """``RUN/metrics.csv``: a header, then one row per step, flushed as it goes."""

    def __init__(self, path: Path, records: list[StepRecord]) -> None:
        # Rewrite the rows a resumed run already has (any rows after its checkpoint are dropped,
        # since those steps will be done again), then append from here on.
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(COLUMNS)
        writer.writerows(_row(r) for r in records)
        atomic_write_text(path, buf.getvalue())
        self._file = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - kept open
        self._writer = csv.writer(self._file)

    def write(self, record: StepRecord) -> None:
        self._writer.writerow(_row(record))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, float]]:
    """Rows of a ``metrics.csv`` as floats (empty ``val_loss`` cells become NaN)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: float(v) if v != "" else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


def plot_losses(records: list[StepRecord], best_step: int) -> Any:
    """Train and val loss against step, the best step marked, and the LR below: a matplotlib
    ``Figure`` built without pyplot (no GUI, nothing shown twice in notebooks)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5))
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    steps = [r.step for r in records]
    ax_loss.plot(steps, [r.train_loss for r in records], lw=0.8, alpha=0.6, label="train loss")
    evals = [r for r in records if not math.isnan(r.val_loss)]
    ax_loss.plot([r.step for r in evals], [r.val_loss for r in evals], "o-", label="val loss")
    best = [r for r in evals if r.step == best_step]
    if best:
        ax_loss.axvline(best_step, color="green", ls="--", lw=1)
        ax_loss.annotate(f"best {best[0].val_loss:.3f} @ {best_step}", (best_step, best[0].val_loss),
                         textcoords="offset points", xytext=(5, 10), color="green")  # fmt: skip
    ax_loss.set_ylabel("loss (nats/char)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r.lr for r in records], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


class ProgressBar(Callback):
    """A tqdm bar (step, loss, lr, tokens/s, ETA) plus one line per evaluation and message.

    ``tqdm_cls`` is ``tqdm.tqdm`` in a terminal or ``tqdm.auto.tqdm`` in a notebook; ``write``
    prints a line without breaking the bar.
    """

    def __init__(self, tqdm_cls: Any, write: Callable[[str], None]) -> None:
        self.tqdm_cls, self.write = tqdm_cls, write
        self.bar: Any = None
        self.last_val = ""
        self.expected = False  # whether a time budget set the total (on_total)

    def on_start(self, total_steps: int, first_step: int) -> None:
        self.bar = self.tqdm_cls(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True)

    def on_total(self, total_steps: int) -> None:
        if self.bar is not None and total_steps != self.bar.total:
            self.expected = True
            self.bar.total = total_steps  # the ETA follows: the steps left at the speed so far

    def on_step(self, record: StepRecord) -> None:
        postfix = f"loss {record.train_loss:.3f} lr {record.lr:.1e} {record.tokens_per_s:,.0f} tok/s"
        self.bar.set_postfix_str(postfix + self.last_val, refresh=False)
        self.bar.update(1)

    def on_eval(self, step: int, val_loss: float, improved: bool) -> None:
        self.last_val = f" val {val_loss:.3f}"
        self.write(f"step {step}: val loss {val_loss:.4f}" + ("  (best so far, saved)" if improved else ""))

    def on_message(self, message: str) -> None:
        self.write(message)

    def on_samples(self, samples: list[dict[str, Any]]) -> None:
        for s in samples:
            said = " ".join(s["text"].split())  # one line under the bar, whatever the model wrote
            self.write(f"  {s['prompt'][:30]!r} -> {said[:80]!r}")

    def on_end(self, summary: dict[str, Any]) -> None:
        if self.bar is not None:
            if self.bar.total and self.bar.n < self.bar.total and self.expected:
                self.bar.total = self.bar.n  # the budget ended the run: it was all the steps there were
            self.bar.close()
            self.bar = None


class TensorBoardCallback(Callback):
    """Mirror the metrics into ``RUN/tensorboard`` (needs the ``tensorboard`` package)."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def on_step(self, record: StepRecord) -> None:
        for name in ("train_loss", "lr", "grad_norm", "tokens_per_s"):
            self.writer.add_scalar(name, getattr(record, name), record.step)
        if not math.isnan(record.val_loss):
            self.writer.add_scalar("val_loss", record.val_loss, record.step)

    def on_end(self, summary: dict[str, Any]) -> None:
        self.writer.close()
