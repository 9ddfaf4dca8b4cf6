"""The GPU code paths: skipped without CUDA (CI has none); run by ``benchmarks/gpu_check.sh``.

What only a GPU exercises: SDPA's fused kernels against the readable manual attention, bf16
autocast and fp16 with a GradScaler in real training steps (AdamW, and Muon + AdamW), the KV
cache and the flat one-token decode step on the device, and a checkpoint written from the GPU that
loads on the CPU with the same outputs.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers_model import all_logits
from helpers_train import prepare, trainer
from minigpt2.core.config import ModelConfig, SampleConfig
from minigpt2.core.model import GPT, KVCache
from minigpt2.core.stream import generate_ids
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.fast import speed_up
from minigpt2.fast.decode import Decoder
from minigpt2.storage import checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def gpt(attn_impl: str = "sdpa", dropout: float = 0.0, n_embd: int = 64) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=60, block_size=64, n_layer=2, n_head=4, n_embd=n_embd, dropout=dropout,
                         attn_impl=attn_impl)  # fmt: skip
    return GPT(config).to(CUDA).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sdpa_matches_manual_attention_on_the_gpu(dtype: torch.dtype) -> None:
    sdpa, manual = gpt("sdpa"), gpt("manual")
    idx = torch.randint(0, 60, (4, 64), device=CUDA)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        a, _ = sdpa(idx)
        b, _ = manual(idx)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_training_steps_on_the_gpu(tmp_path: Path, dtype: str, optimizer: str) -> None:
    data = prepare(tmp_path)
    with trainer(data, tmp_path / "run", device="cuda", dtype=dtype, dropout=0.1, optimizer=optimizer) as t:
        assert t.parts.precision.name == dtype and t.parts.loop.scaler.is_enabled() == (dtype == "fp16")
        losses = [t.train_step()[0] for _ in range(30)]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # it learns


def test_kv_cache_on_the_gpu_matches_the_reference_path() -> None:
    model = gpt()
    cfg = SampleConfig(max_new_tokens=150, temperature=0.0)  # past the 64-token window: it slides
    cached = list(generate_ids(speed_up(gpt()), [1, 2, 3], cfg, use_cache=True))  # the flat step
    uncached = list(generate_ids(model, [1, 2, 3], cfg, use_cache=False))
    assert cached == uncached and len(cached) == 150


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_embd", [64, 36])  # head size 9: SDPA pads it on the GPU
def test_the_flat_decode_step_on_the_gpu_gives_the_model_logits(dtype: torch.dtype, n_embd: int) -> None:
    model = gpt(n_embd=n_embd)
    idx = torch.randint(0, 60, (1, 40), device=CUDA)
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        full = all_logits(model, idx)
        cache = KVCache(model.config)
        model(idx[:, :10], cache=cache)
        decoder = Decoder(model)
        steps = torch.stack([decoder.step(int(idx[0, t]), cache).float() for t in range(10, 40)])
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(steps, full[0, 10:40].float(), atol=tol, rtol=tol)


def test_a_gpu_checkpoint_loads_on_the_cpu(tmp_path: Path) -> None:
    model = gpt()
    tok = CharTokenizer([chr(c) for c in range(65, 65 + 56)])
    checkpoint.save(tmp_path / "best", model, tok, {"step": 0})
    loaded, _, _ = checkpoint.load_model(tmp_path / "best", "cpu")
    idx = torch.randint(0, 60, (2, 64))
    with torch.no_grad():
        on_gpu, _ = model(idx.to(CUDA))
        on_cpu, _ = loaded(idx)
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-4)
