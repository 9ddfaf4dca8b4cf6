"""The optimizer: AdamW, as GPT-2 was trained, with Muon for the blocks' matrices as an option.

An optimizer turns each step's gradients into a change of the weights. AdamW keeps, per weight, a
running mean of its gradient (momentum, ``beta1``) and of its square (``beta2``), and moves the
weight by the first over the square root of the second: every weight takes steps of about the
learning rate, whatever the size of its gradients. Its weight decay multiplies the weights by
``1 - lr * weight_decay`` every step, apart from the gradient step ("decoupled"): a model that needs
large weights must earn them. Only matrices decay (the linear layers' weights and the embeddings); biases and
LayerNorm's gains shift and scale activations, and shrinking them towards 0 would only fight that.

With ``optimizer="muon"`` the blocks' weight matrices go to Muon (``core/muon.py``) and the rest
stays with AdamW; the loop drives both as one.
Tests: ``pytest tests/core/test_optim.py``.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from minigpt2.core.config import TrainConfig
from minigpt2.core.muon import Muon, Optimizers


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device, muon_dtype: torch.dtype | None = None
) -> torch.optim.Optimizer:
    """``cfg.optimizer``: "adamw", or "muon" (Muon for the blocks' matrices, AdamW for the rest).

    Each param group carries ``lr_scale``: the training loop sets its LR to the schedule's LR times
    that (Muon's group: ``muon_lr / lr``, so both follow the same warm-up and decay).
    ``muon_dtype``: the dtype of Muon's matrix products; by default bf16 on a CUDA GPU that has it,
    else fp32 (the product's trainer measures whether a CPU multiplies bf16 faster).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # The blocks' weight matrices: transformer.h.<i>.attn.c_attn.weight and the like.
    in_blocks = [p for n, p in named if n.startswith("transformer.h.") and p.dim() == 2]
    matrices = in_blocks if cfg.optimizer == "muon" else []
    taken = {id(p) for p in matrices}
    rest = [p for _, p in named if id(p) not in taken]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    try:  # fused: one kernel for all weights' updates where the device has it
        adamw = torch.optim.AdamW(groups, fused=device.type in ("cuda", "cpu"), **kwargs)
    except (RuntimeError, TypeError):
        adamw = torch.optim.AdamW(groups, **kwargs)
    if not matrices:
        return adamw
    if muon_dtype is None:
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        muon_dtype = torch.bfloat16 if cuda_bf16 else torch.float32
    muon = Muon([{"params": matrices, "lr_scale": cfg.muon_lr / cfg.lr}], lr=cfg.muon_lr,
                weight_decay=cfg.weight_decay, ns_dtype=muon_dtype)  # fmt: skip
    # Not an Optimizer subclass, but it has every part of one that is used (see its docstring).
    return cast(torch.optim.Optimizer, Optimizers(muon, adamw))
