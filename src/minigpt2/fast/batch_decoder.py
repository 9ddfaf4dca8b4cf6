"""Continuous batching: many generations advanced together, one id per row per batched step.

Replaces running ``core/stream.generate_ids`` once per conversation (one thread each, each step a
batch-1 pass that reads every weight for one character). ``BatchDecoder`` holds up to ``max_rows``
generations (rows) over one model and advances every running row by one id in ONE forward pass
(``batch_step.BatchStep``): with B rows the matrix-vector products of a step become matrix-matrix
products that read the weights once for all rows, and the ~100 small operations of a step are paid
once, not B times. Rows join and leave between steps: a row that draws a stop id, reaches its
``max_new_tokens`` or is cancelled leaves at once, and the next ``add`` takes its slot.

Measured by ``benchmarks/batch_decode.py`` (``cpu`` preset, fp32, AMD EPYC, 1 thread of a busy
2-core machine): 5 rows 1.7x, 20 rows 1.8x, 50 rows 1.9x the characters/s of one row through
``generate_ids`` on the engine; 1 row 0.98x. The gain stops growing on a CPU because, past a few
rows, a step is bound by reading every row's KV cache (50 rows of 128 positions are 39 MB in fp32,
more than the L3 cache), and each row still pays its own refills and sampling (about 100 of the
~260 us per character at 50 rows).

Each row follows ``generate_ids``'s rules with its own options (``SampleConfig``, stop ids,
``min_new_tokens``, repetition penalty over its window) and its own ``torch.Generator``, and draws
each id as ``core/stream.next_token`` does, so a seeded row gives the same ids alone or among
others (up to the rounding of a product with B rows against one, which flips an id only on a near
tie). Rows with the same plain options (temperature and top-k; no top-p, penalty or barred stop
ids) are drawn in one batched operation (``draw_together``: the same ids, each from its row's
generator), which costs a third of drawing them one by one. Past the context window a row slides
by ``generate_ids``'s rule (``core/stream.slid_window``) and refills its slot from the ids kept.

Row b lives in slot b of the batched cache: running rows stay in slots 0 .. B-1 (a leaving row's
slot takes the last row's cache), so a step never computes an empty slot; rows of different
lengths share the pass through per-row positions and a mask over the cached keys (``batch_step``).
A prompt (or a slid window) is prefilled by the model itself at batch 1, all but its last id, into
a fresh ``KVCache`` that is copied into the row's slot; the last id goes through the next batched
step like every other row's newest id, so every step is the same single pass over all rows.
Inference only. ``tests/fast/test_batch.py`` checks each row's ids against ``generate_ids`` run alone on
the textbook model, and the logits against the textbook model's (fp32, to rounding).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from minigpt2.core.config import SampleConfig
from minigpt2.core.generate import make_generator
from minigpt2.core.model import GPT, KVCache
from minigpt2.core.stream import first_window, next_token, slid_window
from minigpt2.fast.batch_step import BatchStep
from minigpt2.hardware.precision import Precision


@dataclass(eq=False)
class Row:
    """One generation in a ``BatchDecoder``: the handle ``add`` returns. Read-only for callers."""

    number: int  # the order it was added in, unique within its decoder
    cfg: SampleConfig
    stops: frozenset[int]
    min_new_tokens: int
    generator: torch.Generator
    tokens: list[int]  # the prompt, then every id generated
    prompt_len: int
    start: int  # the window is tokens[start:], as in generate_ids
    slot: int = -1
    length: int = 0  # positions of the window in its cache slot
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error" once it has left
    error: BaseException | None = None  # why it failed, when finish_reason is "error"
    logits: Tensor | None = field(default=None, repr=False)  # (V,): what its newest id was drawn from

    @property
    def new_ids(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class BatchDecoder:
    """Up to ``max_rows`` generations over ``model``, advanced together by ``step``.

    Not thread-safe: one thread (a server's decoding loop) calls ``add``, ``step`` and ``cancel``.
    The weights are taken when the decoder is made, as ``Decoder``'s: make a new one after
    ``model.to(...)``. ``batch`` (``BatchStep``) holds them and the cache of ``max_rows`` slots.
    """

    def __init__(self, model: GPT, max_rows: int = 32, precision: Precision | None = None) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.model, self.max_rows, self.precision = model, max_rows, precision
        self.batch = BatchStep(model, max_rows)
        self.block = model.config.block_size
        self.rows: list[Row] = []  # the running rows, row i in slot i
        self._added = 0
        self._no_ids = torch.zeros(0, dtype=torch.long)  # the window, when no penalty needs it

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        return self.precision.autocast() if self.precision is not None else contextlib.nullcontext()

    @property
    def free(self) -> int:
        return self.max_rows - len(self.rows)

    @torch.inference_mode()
    def add(
        self,
        prompt: Sequence[int],
        cfg: SampleConfig,
        *,
        stop_ids: Iterable[int] = (),
        min_new_tokens: int = 0,
        generator: torch.Generator | None = None,
    ) -> Row:
        """Start a generation of up to ``cfg.max_new_tokens`` ids after ``prompt`` (the rules of
        ``generate_ids``); it draws its first id at the next ``step``."""
        if not prompt:
            raise ValueError("generation needs at least one prompt id")
        if not self.free:
            raise RuntimeError(f"all {self.max_rows} rows are busy; add after a row finishes")
        tokens = list(prompt)
        row = Row(self._added, cfg, frozenset(stop_ids), min_new_tokens,
                  generator if generator is not None else make_generator(cfg.seed),
                  tokens, len(tokens), start=first_window(len(tokens), self.block))  # fmt: skip
        self._added += 1
        row.slot = len(self.rows)
        self.rows.append(row)
        try:
            self._fill(row)
        except BaseException:
            self.rows.pop()
            raise
        return row

    @torch.inference_mode()
    def cancel(self, row: Row) -> None:
        """Stop ``row`` now (a client went away); its slot is free for the next ``add``."""
        if not row.finished:
            self._leave(row, "cancelled")

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, int | None]]:
        """Advance every running row by one id in one batched pass. Returns one event per row that
        was running: (row, id), or (row, None) when it drew a stop id or failed. A row that ends
        (stop id, this was its ``max_new_tokens``-th id, or its draw failed: ``row.error``) has left
        when this returns: see ``row.finish_reason``. One row's failure is that row's alone."""
        if not self.rows:
            return []
        for row in self.rows:
            slid = slid_window(len(row.tokens), row.start, self.block)
            if slid != row.start:  # the window slid: refill the row's slot from it
                row.start = slid
                self._fill(row)
        device, lengths = self.model.device, [r.length for r in self.rows]
        ids = torch.tensor([r.tokens[-1] for r in self.rows], dtype=torch.long, device=device)  # (B,)
        pos = torch.tensor(lengths, dtype=torch.long, device=device)  # (B,): where each id goes
        with self._autocast():
            logits = self.batch(ids, pos, max(lengths) + 1, ragged=min(lengths) != max(lengths))
        logits = logits.float().cpu()  # (B, V): one transfer for all rows
        rows = list(self.rows)  # before any row leaves (and the last one moves into its slot)
        for row, row_logits in zip(rows, logits, strict=True):
            row.length += 1
            row.logits = row_logits
        drawn = self._draw_all(rows, logits)
        return [(row, self._take(row, nxt)) for row, nxt in zip(rows, drawn, strict=True)]

    def _draw_safely(self, row: Row, logits: Tensor) -> int | Exception:
        """``_draw``, or the error that stopped it: it fails ``row`` alone, never the batch."""
        try:
            return self._draw(row, logits)
        except Exception as err:
            return err

    def _draw_all(self, rows: list[Row], logits: Tensor) -> list[int | Exception]:
        """Each row's next id from its logits (B, V), as ``generate_ids`` draws it alone, or the
        error that fails that row. Rows that share plain options (no penalty, no top-p, no ids
        barred yet) and whose logits are numbers are drawn together (``draw_together``); the others
        one by one, as ``generate_ids`` does (``sample`` refuses logits that hold NaN)."""
        drawn: list[int | Exception] = [0] * len(rows)
        together: dict[tuple[float, int], list[int]] = {}
        broken = (torch.isnan(logits).any(dim=-1) | torch.isposinf(logits).any(dim=-1)).tolist()  # (B,)
        for i, row in enumerate(rows):
            cfg, barred = row.cfg, len(row.tokens) - row.prompt_len < row.min_new_tokens and row.stops
            if broken[i] or barred or cfg.repetition_penalty != 1.0 or cfg.top_p < 1.0:
                drawn[i] = self._draw_safely(row, logits[i])
            else:
                together.setdefault((cfg.temperature, cfg.top_k), []).append(i)
        for (temperature, top_k), members in together.items():
            generators = [rows[i].generator for i in members]
            for i, nxt in zip(
                members, draw_together(logits[members], temperature, top_k, generators), strict=True
            ):
                drawn[i] = nxt
        return drawn

    def _draw(self, row: Row, logits: Tensor) -> int:
        """``row``'s next id from its logits (V,), alone, as generate_ids draws it."""
        if len(row.tokens) - row.prompt_len < row.min_new_tokens and row.stops:
            logits = logits.index_fill(0, torch.tensor(sorted(row.stops)), float("-inf"))
        # The window's ids matter only to the repetition penalty; skip building them otherwise.
        window = torch.tensor(row.tokens[row.start :]) if row.cfg.repetition_penalty != 1.0 else self._no_ids
        return next_token(logits, row.cfg, window, row.generator)

    def _take(self, row: Row, nxt: int | Exception) -> int | None:
        """``row`` goes on with ``nxt``, or ends (a stop id, its ``max_new_tokens``-th id, or the
        error its draw raised)."""
        if isinstance(nxt, Exception):
            row.error = nxt
            self._leave(row, "error")
            return None
        if nxt in row.stops:
            self._leave(row, "stop")
            return None
        row.tokens.append(nxt)
        if len(row.tokens) - row.prompt_len >= row.cfg.max_new_tokens:
            self._leave(row, "length")
        return nxt

    def _fill(self, row: Row) -> None:
        """Prefill ``row``'s window but its last id with the model (batch 1, a fresh cache), then
        copy it into the row's slot; the last id is fed by the next step."""
        window = row.tokens[row.start : -1]
        row.length = len(window)
        if not window:
            return
        cache = KVCache(self.model.config)
        idx = torch.tensor([window], dtype=torch.long, device=self.model.device)  # (1, T)
        with self._autocast():
            # The model's own forward: FastGPT would send an int8 model's last id through its step.
            GPT.forward(self.model, idx, cache=cache)
            assert cache.kv is not None
            self.batch.put(row.slot, cache.kv[:, :, 0, :, : row.length])

    def _leave(self, row: Row, reason: str) -> None:
        """Take ``row`` out; the last row moves into its slot, so running rows stay in 0 .. B-1."""
        row.finish_reason = reason
        last = self.rows.pop()
        if last is not row:
            self.batch.move(last.slot, row.slot, last.length)
            last.slot, self.rows[row.slot] = row.slot, last
        row.slot = -1


def draw_together(
    logits: Tensor, temperature: float, top_k: int, generators: Sequence[torch.Generator]
) -> list[int]:
    """``core.generate.sample`` for B rows with the same temperature and top-k (top-p 1), in one
    batched draw: logits (B, V) -> B ids, each the one ``sample`` draws from its row alone with
    its generator. ``torch.multinomial`` draws one sample from probabilities p as
    argmax(p / e) with e exponential noise from the generator (one draw per id), so each row's
    noise comes from its own generator and the rest is one operation for all rows."""
    if temperature == 0:
        return logits.argmax(dim=-1).tolist()
    logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): each row's k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    noise = torch.stack([torch.empty(probs.size(-1)).exponential_(1, generator=g) for g in generators])
    return (probs / noise).argmax(dim=-1).tolist()


def generate_many(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    cfgs: SampleConfig | Sequence[SampleConfig],
    *,
    stop_ids: Iterable[int] = (),
    min_new_tokens: int = 0,
    generators: Sequence[torch.Generator | None] | None = None,
    precision: Precision | None = None,
    max_rows: int = 32,
) -> Iterator[tuple[int, int]]:
    """Generate after every prompt, ``max_rows`` at a time, yielding (prompt index, id) as ids are
    drawn; prompt i's ids, in order, are those of ``generate_ids(model, prompts[i], cfgs[i], ...)``.

    ``cfgs`` is one ``SampleConfig`` for all, or one per prompt; ``generators`` one per prompt (a
    fresh one from its config's seed where None). Prompts beyond ``max_rows`` wait and take the
    slots of rows that finish. Several answers to one prompt (OpenAI's ``n``) are the same prompt
    n times with n different generators.
    """
    n = len(prompts)
    cfg_list = [cfgs] * n if isinstance(cfgs, SampleConfig) else list(cfgs)
    gens = list(generators) if generators is not None else [None] * n
    if len(cfg_list) != n or len(gens) != n:
        raise ValueError(f"{n} prompts need {n} sample configs and generators")
    stops = tuple(stop_ids)
    decoder = BatchDecoder(model, max_rows, precision)
    waiting = deque(range(n))
    index: dict[Row, int] = {}
    while waiting or decoder.rows:
        while waiting and decoder.free:
            i = waiting.popleft()
            row = decoder.add(prompts[i], cfg_list[i], stop_ids=stops, min_new_tokens=min_new_tokens,
                              generator=gens[i])  # fmt: skip
            index[row] = i
        for row, nxt in decoder.step():
            if row.error is not None:
                raise row.error
            if nxt is not None:
                yield index[row], nxt
