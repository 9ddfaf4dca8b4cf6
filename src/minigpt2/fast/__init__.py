"""The engine: faster drop-ins for pieces of the textbook model, swapped in by one call.

``speed_up(model)`` gives each textbook module of a ``GPT`` the class of its fast drop-in, in place:

| textbook piece (core/model.py)  | drop-in                                               | faster in       |
|---------------------------------|-------------------------------------------------------|-----------------|
| ``nn.Dropout``                  | ``dropout.FastDropout``: SFC64 masks                  | CPU training    |
| ``nn.GELU(approximate="tanh")`` | ``gelu.CompiledGELU``: one loop                       | CPU training    |
| ``MLP``                         | ``gelu.CompiledGELUMLP``: c_fc's bias in that loop    | CPU training    |
| ``CausalSelfAttention``         | ``attention.CPUTrainingAttention``: one autograd node | CPU training    |
| ``GPT.forward`` for one token   | ``decode.FastGPT``: the flat decode step              | generation      |
| ``Muon.orthogonalize``          | ``muon.GramMuon``: on Gram matrices                   | fp32 Muon steps |

Each drop-in is a subclass (``FastGPT`` keeps only a cache of transposed views of the weights,
rebuilt at every prompt): it overrides ``forward`` and adds helpers, never
parameters, so the model keeps its parameters, ``state_dict``, optimizer and checkpoints, and
``to_reference(model)`` puts the textbook classes back (``torch.nn.utils.parametrize`` re-classes
modules the same way); ``use_optimizer_engine`` does the same for the optimizer made for the model.
Outside the cases in the last column each drop-in runs the textbook code.
``FastGPT.decode_weights`` ("fp32" unless ``inference.load_for_inference`` sets it) chooses the
weights its one-token steps read: "int8" is ``int8.Int8Linear``, a quarter of the bytes and
slightly different numbers (``--decode-weights``, ``auto`` = int8 on a CPU for blocks of 4 MiB or
more). Beside the model, ``memory.keep_freed_memory`` keeps freed memory in the process while
training on a CPU, and ``batch_decoder.BatchDecoder`` advances many conversations together, one
batched step for all (the drop-in for running ``core.stream.generate_ids`` once per conversation).
Each piece is tested to compute what its textbook piece computes: ``tests/fast/test_fast.py``,
``tests/fast/test_attention.py``, ``tests/fast/test_gelu.py``, ``tests/fast/test_decode.py``,
``tests/fast/test_batch.py``, ``tests/fast/test_muon.py`` (and the int8 steps to stay close to it:
``tests/fast/test_int8.py``).

``ENGINES``: the values of the one setting that chooses between them (``engine`` in ``TrainConfig``,
``--engine`` on every command): ``fast`` (the default) or ``reference`` (the textbook alone).
"""

from __future__ import annotations

import torch
from torch import nn

from minigpt2.core.model import GPT, MLP, CausalSelfAttention
from minigpt2.core.muon import Muon
from minigpt2.fast.attention import CPUTrainingAttention
from minigpt2.fast.decode import FastGPT
from minigpt2.fast.dropout import FastDropout
from minigpt2.fast.gelu import CompiledGELU, CompiledGELUMLP
from minigpt2.fast.muon import GramMuon

ENGINES = ("fast", "reference")

# Textbook class -> its drop-in. GELU only in the tanh form GPT-2 uses.
DROP_INS: dict[type[nn.Module], type[nn.Module]] = {
    GPT: FastGPT,
    CausalSelfAttention: CPUTrainingAttention,
    MLP: CompiledGELUMLP,
    nn.Dropout: FastDropout,
    nn.GELU: CompiledGELU,
}


def speed_up(model: GPT) -> GPT:
    """Swap the engine's drop-ins into ``model`` (in place; call before ``torch.compile``/DDP)."""
    for module in model.modules():
        fast = DROP_INS.get(type(module))
        if fast is not None and not (isinstance(module, nn.GELU) and module.approximate != "tanh"):
            module.__class__ = fast
    return model


def to_reference(model: GPT) -> GPT:
    """Undo ``speed_up``: every module back to its textbook class (in place)."""
    textbook = {fast: plain for plain, fast in DROP_INS.items()}
    model.__dict__.pop("_decoder", None)  # FastGPT's views of the weights go with it
    for module in model.modules():
        plain = textbook.get(type(module))
        if plain is not None:
            module.__class__ = plain
    return model


def use_engine(model: GPT, engine: str) -> GPT:
    """``speed_up`` for ``engine="fast"``, ``to_reference`` for ``"reference"``."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be fast or reference, got {engine!r}")
    return speed_up(model) if engine == "fast" else to_reference(model)


def use_optimizer_engine(optimizer: torch.optim.Optimizer, engine: str) -> torch.optim.Optimizer:
    """``use_engine`` for the optimizer ``core.optim.make_optimizer`` made (in place): with
    ``engine="fast"`` its ``Muon`` becomes ``GramMuon``, with ``"reference"`` the textbook's again.
    The state and the state dict stay as they are."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be fast or reference, got {engine!r}")
    old, new = (Muon, GramMuon) if engine == "fast" else (GramMuon, Muon)
    for inner in getattr(optimizer, "optimizers", (optimizer,)):  # core.muon.Optimizers holds several
        if type(inner) is old:
            inner.__class__ = new
    return optimizer
