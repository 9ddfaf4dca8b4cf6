"""Typed configs for the model, training and sampling, the named presets, and their validation.

Every setting is a dataclass field with a default and a comment saying why; ``__post_init__`` checks
ranges so a bad value fails at once with one clear line (a ``ConfigError``), not deep inside torch.
Settings resolve in three layers (``resolve``): a preset, then a TOML/JSON config file, then
command-line flags. Reading that file, and a run's saved settings, is the trainer's
(``training/run_configs.py``): this module reads no file.

Tested through its users: ``pytest tests/training/test_train.py tests/promises/test_hostile_input.py``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from minigpt2.errors import ConfigError, names


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds; training adds the rank and 1 to it


def _check_finite(config: Any) -> None:
    """NaN and infinity pass every range check written as a comparison, so reject them first."""
    for f in fields(config):
        value = getattr(config, f.name)
        _check(
            not isinstance(value, float) or math.isfinite(value),
            f"{f.name} must be a finite number, got {value}",
        )


@dataclass
class ModelConfig:
    """The shape of a GPT-2 model. Field names follow GPT-2 (and Hugging Face's ``GPT2Config``)."""

    vocab_size: int = 128  # set from the corpus' tokenizer; specials included
    block_size: int = 128  # context window in characters (GPT-2's n_positions)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block; must divide n_embd
    n_embd: int = 256  # residual stream width C; head size hs = n_embd // n_head
    dropout: float = 0.0  # on embeddings, attention weights and residual branches (training only)
    # How the model computes attention: "sdpa" (PyTorch's fused kernel) or "manual" (written out
    # in model.py); the same function. The fast engine replaces it in CPU training only (fast/).
    attn_impl: str = "sdpa"

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(1 <= self.vocab_size <= 65536, f"vocab_size must be 1..65536, got {self.vocab_size}")
        _check(self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        _check(self.n_layer >= 1, f"n_layer must be >= 1, got {self.n_layer}")
        _check(self.n_head >= 1, f"n_head must be >= 1, got {self.n_head}")
        _check(
            self.n_embd >= 1 and self.n_embd % self.n_head == 0,
            f"n_embd ({self.n_embd}) must be a positive multiple of n_head ({self.n_head})",
        )
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        if self.attn_impl == "auto":  # older runs' name for what is now the default
            self.attn_impl = "sdpa"
        _check(
            self.attn_impl in ("sdpa", "manual"), f"attn_impl must be sdpa or manual, got {self.attn_impl!r}"
        )


@dataclass
class TrainConfig:
    """How to train: optimisation, the five founding techniques, evaluation and logging."""

    max_iters: int = 3000  # optimizer steps (each one sees batch_size * grad_accum sequences)
    batch_size: int = 32  # sequences per micro-batch (per process under DDP)
    grad_accum: int = 1  # micro-batches summed per optimizer step (a bigger batch in less memory)
    # The most tokens one forward/backward pass holds: a bigger micro-batch runs in pieces whose
    # gradients add up to the same step (each weighted by its share of the counted targets).
    # 0 = auto: 4096 on a CPU (faster there, and a quarter of the activation memory at batch
    # 64 x 256: docs/performance.md), no limit on a GPU.
    max_pass_tokens: int = 0
    lr: float = 2e-3  # peak learning rate, reached at the end of warm-up
    min_lr: float = 2e-4  # floor of the decay; nanoGPT's rule of thumb is lr / 10
    lr_schedule: str = "cosine"  # "cosine", "linear" or "constant" after warm-up
    warmup_iters: int = 100  # linear warm-up from lr / warmup_iters (never 0) up to lr
    # Decoupled decay of 2-D weights only (not biases, not LayerNorm): each step shrinks them by
    # lr * weight_decay; with Muon, its matrices by muon_lr * weight_decay (10x more per step)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99  # GPT-2 used 0.95 for huge batches; 0.99 is steadier for small char models
    # "adamw" (GPT-2's), or "muon": Muon for the blocks' weight matrices and AdamW for the rest,
    # which learns more per step (optim.py; the `cpu` and `chat` presets use it: docs/performance.md)
    optimizer: str = "adamw"
    muon_lr: float = 0.02  # Muon's peak LR, on the same warm-up and decay as lr (its steps differ in scale)
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 turns clipping off
    eval_interval: int = 250  # evaluate (and save `last`) every this many steps
    eval_iters: int = 20  # fixed validation batches per evaluation (the same ones every time)
    early_stopping: bool = True  # stop after `patience` evaluations without improvement
    patience: int = 5  # evaluations without a val-loss improvement before stopping
    min_delta: float = 0.0  # an improvement must beat the best val loss by more than this
    max_minutes: float = 0.0  # wall-time budget for training; 0 means no limit
    # Fit the preset to this machine and max_minutes before the run (training/fit.py): the widest
    # n_embd whose timed steps fill the budget with enough of them; a narrowed model also trains at
    # half the batch and without dropout; max_iters is raised so the budget ends the run. On for the
    # default chatbot and for `train --max-minutes M` without a preset.
    fit_to_budget: bool = False
    dtype: str = "auto"  # "auto", "bf16", "fp16" or "fp32"; auto: hardware/precision.py decides
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", "mps"
    compile: bool = False  # torch.compile the model (pays off for long runs and on GPUs)
    # "fast": the engine's drop-ins for the textbook pieces (fast/: same results, faster);
    # "reference": the textbook model alone
    engine: str = "fast"
    loss_on: str = "all"  # "all" tokens, or "bot" turns only (chat fine-tuning)
    seed: int = 1337  # same seed, same run: weights, batches and dropout
    tensorboard: bool = False  # also log to RUN/tensorboard (needs the `tensorboard` package)
    # At each evaluation, what the model says now: RUN/samples.jsonl, under the progress bar
    samples: bool = True
    # Their prompts, separated by "|"; empty: the first user messages of the validation
    # conversations (dialogue corpora) or the start of the validation text
    sample_prompts: str = ""

    def __post_init__(self) -> None:
        _check_finite(self)
        for name in ("max_iters", "batch_size", "grad_accum", "eval_interval", "eval_iters"):
            value = getattr(self, name)
            _check(value >= 1, f"{name} must be >= 1, got {value}")
        _check(
            self.max_pass_tokens >= 0, f"max_pass_tokens must be >= 0 (0 = auto), got {self.max_pass_tokens}"
        )
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(0 <= self.min_lr <= self.lr, f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        _check(
            self.lr_schedule in ("cosine", "linear", "constant"),
            f"lr_schedule must be cosine, linear or constant, got {self.lr_schedule!r}",
        )
        _check(self.warmup_iters >= 0, f"warmup_iters must be >= 0, got {self.warmup_iters}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        _check(
            self.optimizer in ("adamw", "muon"), f"optimizer must be adamw or muon, got {self.optimizer!r}"
        )
        _check(self.muon_lr > 0, f"muon_lr must be > 0, got {self.muon_lr}")
        _check(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        _check(
            self.patience >= 1 or not self.early_stopping,
            f"patience must be >= 1 with early stopping on, got {self.patience}"
            " (use --no-early-stopping to turn it off)",
        )
        _check(self.min_delta >= 0, f"min_delta must be >= 0, got {self.min_delta}")
        _check(self.max_minutes >= 0, f"max_minutes must be >= 0, got {self.max_minutes}")
        _check(
            not self.fit_to_budget or self.max_minutes > 0,
            "fit_to_budget needs a time budget to fit (--max-minutes M), or --no-fit-to-budget",
        )
        _check(
            self.dtype in ("auto", "bf16", "fp16", "fp32"),
            f"dtype must be auto, bf16, fp16 or fp32, got {self.dtype!r}",
        )
        _check(self.engine in ("fast", "reference"), f"engine must be fast or reference, got {self.engine!r}")
        _check(self.loss_on in ("all", "bot"), f"loss_on must be all or bot, got {self.loss_on!r}")
        _check(0 <= self.seed <= MAX_SEED, f"seed must be in [0, 2**63 - 1], got {self.seed}")


# Sampling settings, one rule for every front end (the CLI flags, /set in the chat, the notebook's
# keywords, the HTTP API): each range is where the arithmetic of ``core/generate.py`` stays finite.
# A temperature below GREEDY_BELOW would divide logits into infinities (1e-300 is 0 in float32),
# and its limit is the likeliest character anyway, so it counts as 0, greedy. The range of
# temperatures is OpenAI's. A penalty outside [0.01, 100] would multiply logits past what float32
# holds for no change in what is drawn: at 100 a character already seen is all but never drawn.
GREEDY_BELOW = 1e-4
MAX_TEMPERATURE = 2.0
REPETITION_PENALTY_RANGE = (0.01, 100.0)


@dataclass
class SampleConfig:
    """How to pick each next character. Defaults give varied but coherent text.

    The one home of the sampling settings' rules: every front end builds one of these, and a value
    out of range is a ``ConfigError`` naming the setting (``err.setting``)."""

    max_new_tokens: int = 500  # characters to generate at most
    # < 1 sharper, > 1 flatter, at most 2; 0 means greedy (always the likeliest), as does anything
    # below GREEDY_BELOW
    temperature: float = 0.8
    top_k: int = 0  # keep only the k likeliest characters; 0 keeps all
    # keep the smallest set whose probability reaches top_p (the likeliest always stays, so 0 keeps
    # only it); 1 keeps all
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 makes characters already in the context less likely
    seed: int | None = None  # same seed, same text; None draws a fresh one

    def __post_init__(self) -> None:
        low, high = REPETITION_PENALTY_RANGE
        rules = [
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("temperature", 0 <= self.temperature <= MAX_TEMPERATURE, f"in [0, {MAX_TEMPERATURE:g}]"),
            ("top_k", self.top_k >= 0, ">= 0 (0 keeps all)"),
            ("top_p", 0 <= self.top_p <= 1, "in [0, 1]"),
            ("repetition_penalty", low <= self.repetition_penalty <= high, f"in [{low:g}, {high:g}]"),
            ("seed", self.seed is None or 0 <= self.seed <= MAX_SEED, "in [0, 2**63 - 1]"),
        ]
        for name, ok, allowed in rules:
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison
                raise ConfigError(f"{name} must be a finite number, got {value}", setting=name)
            if not ok:
                raise ConfigError(f"{name} must be {allowed}, got {value}", setting=name)
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0


# What a chatbot samples with unless told otherwise (chat, quickstart, serve, the notebook): answers of
# up to 300 characters, a little sharper than the model's own distribution, from its 40 likeliest.
CHAT_SAMPLE = SampleConfig(max_new_tokens=300, temperature=0.7, top_k=40)


# Presets set model and training fields together; anything not named keeps the dataclass default.
PRESETS: dict[str, dict[str, Any]] = {
    # For tests: trains in seconds, learns nothing useful.
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0, batch_size=8,
                 max_iters=50, eval_interval=10, eval_iters=2, warmup_iters=5, lr=3e-3),
    # The laptop-CPU default: sized so a few minutes of bf16 training gives readable text (192 wide
    # and Muon did best in 5-minute runs on a 2-core CPU; docs/performance.md section 3). Batch 48:
    # ~0.02 above batch 24's val loss at 5 minutes, and Muon's fixed cost per step (~20 ms of
    # matrix products) is half the share of a step (~9% against 19% outside forward/backward).
    # 1,500 steps and an evaluation every 125: the characters per run and between evaluations of
    # batch 24's 3,000 and 250. Passes of up to 6,144 tokens: batch 48 in one pass ran 1.05-1.28x
    # faster than the auto 4,096's passes of 32 + 16 sequences (24 + 24: 0.79x).
    "cpu": dict(n_layer=4, n_head=4, n_embd=192, block_size=128, dropout=0.0, batch_size=48,
                max_iters=1500, eval_interval=125, lr=2e-3, min_lr=2e-4, warmup_iters=100,
                optimizer="muon", max_pass_tokens=6144),
    # The default chatbot (`make chat`): trained from scratch on chatterbot-corpus in under 10 minutes
    # on a 2-core CPU; early stopping ends it once the small corpus starts to be memorised. Muon:
    # val loss 0.865 against AdamW's 0.960 after 3.5 minutes (docs/performance.md section 3).
    "chat": dict(n_layer=4, n_head=4, n_embd=256, block_size=128, dropout=0.1, batch_size=32,
                 max_iters=2500, eval_interval=100, eval_iters=10, patience=4, lr=2e-3, min_lr=2e-4,
                 warmup_iters=100, max_minutes=8.0, optimizer="muon"),
    # The classic char-level Shakespeare model (nanoGPT's shakespeare_char shape): a GPU or a long
    # CPU run. Tuned for a minute on one GPU, which goes over the classic 1.1M characters dozens of
    # times: batch 128, lr 2e-3 and dropout 0.3 reached val loss 1.464 twice (H100, H200; below 1.47
    # after 23-25 s), where nanoGPT's batch 64, lr 1e-3, dropout 0.2 stopped at 1.479-1.490
    # (docs/performance.md, section 7). On 5x more text (the whole works), try --dropout 0.2.
    "shakespeare": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.3,
                        batch_size=128, max_iters=5000, eval_interval=250, lr=2e-3, min_lr=1e-4,
                        warmup_iters=100),
    # GPT-2 small's shape (124M parameters with GPT-2's vocabulary): for GPUs.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0,
                 batch_size=16, lr=6e-4, min_lr=6e-5, warmup_iters=200),
}  # fmt: skip
DEFAULT_PRESET = "cpu"


def field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def resolve(
    preset: str = DEFAULT_PRESET,
    file_values: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """Merge preset < config file < overrides into validated configs.

    ``None`` values in ``overrides`` mean "not given" and are skipped. Unknown keys are an error,
    so a typo in a config file is caught rather than silently ignored.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    merged: dict[str, Any] = dict(PRESETS[preset])
    for layer in (file_values or {}, overrides or {}):
        merged.update({k.replace("-", "_"): v for k, v in layer.items() if v is not None})
    model_keys, train_keys = field_names(ModelConfig), field_names(TrainConfig)
    unknown = sorted(set(merged) - model_keys - train_keys)
    if unknown:
        raise ConfigError(f"unknown setting(s): {names(unknown)}")
    for cls in (ModelConfig, TrainConfig):
        defaults = cls()
        for k, v in merged.items():
            if k in field_names(cls):
                _check_type(cls.__name__, k, v, type(getattr(defaults, k)))
    try:
        model = ModelConfig(**{k: v for k, v in merged.items() if k in model_keys})
        train = TrainConfig(**{k: v for k, v in merged.items() if k in train_keys})
    except TypeError as err:
        raise ConfigError(f"bad setting: {err}") from None
    return model, train


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-ready dict."""
    return dataclasses.asdict(config)


def from_dict(cls: type, values: Any) -> Any:
    """Rebuild a config from ``to_dict`` output, rejecting unknown or wrongly typed fields."""
    if not isinstance(values, dict):
        raise ConfigError(f"{cls.__name__} must be a JSON object")
    unknown = set(values) - field_names(cls)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {names(unknown)}")
    for f in fields(cls):
        if f.name in values:
            _check_type(cls.__name__, f.name, values[f.name], type(getattr(cls(), f.name)))
    return cls(**values)


def _check_type(owner: str, name: str, value: Any, expected: type) -> None:
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if expected is type(None):  # optional fields (SampleConfig.seed)
        ok = value is None or isinstance(value, int)
    if not ok:
        raise ConfigError(f"{owner}.{name} must be {expected.__name__}, got {value!r}")
