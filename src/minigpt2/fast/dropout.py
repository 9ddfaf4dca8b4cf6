"""A faster dropout mask for CPU training: the drop-in for the textbook's ``nn.Dropout``.

torch's CPU ``bernoulli_`` costs ~9-15 ns per element, and dropout masks are the biggest random
draws in training (the attention mask alone is B * nh * T * T per layer): with dropout 0.2 it was
38% of a CPU training step. Here the random bits come from numpy's SFC64 generator (about 3x faster
than torch's CPU generator), seeded from torch's generator on every call, so ``torch.manual_seed``
still fixes the masks; each 64-bit number is read as four uniform 16-bit ones. The 0/1 mask is made
with an integer ``clamp``, not a comparison: torch's CPU kernels for bool tensors (compare, convert,
``where``) are several times slower than those for numbers.

The result is the same dropout as ``nn.Dropout``: each element is zeroed with probability p (to
within 1/65536), the others scaled by 1 / (1 - p); different random numbers, so not the same mask.
The attention's autograd node (``fast/attention.py``) draws its masks from ``keep_mask`` too.
Tests: ``pytest tests/fast/test_fast.py -k dropout`` (drop rate, scaling, seeding).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> Tensor:
    """A CPU tensor of ``shape``: 0 with probability p (to within 1/65536), else 1, in ``dtype``.

    Its seed comes from torch's generator, so ``torch.manual_seed`` fixes it."""
    n = math.prod(shape)
    seed = int(torch.randint(2**63 - 1, ()))
    bits = np.random.SFC64(seed).random_raw((n + 3) // 4)  # (n / 4,) uint64, all bits random
    uniform16 = torch.from_numpy(bits.view(np.int16)[:n]).view(shape)  # in [-32768, 32767]
    # Drop where uniform16 < cut: probability p, in steps of 1/65536 (kept inside int16's range).
    cut = -32768 + min(max(round(p * 65536), 1), 65535)
    # Clamping to [cut - 1, cut] and shifting gives 0 (drop) or 1 (keep), with no bool tensor.
    return uniform16.clamp(cut - 1, cut).sub_(cut - 1).to(dtype)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with SFC64 masks on a CPU in training; ``nn.Dropout`` itself elsewhere."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x  # what nn.Dropout returns too, without its calls (they add up in decoding)
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return super().forward(x)  # GPUs and compiled code make their own fast masks
        return x * keep_mask(x.shape, self.p, x.dtype).mul_(1.0 / (1.0 - self.p))
