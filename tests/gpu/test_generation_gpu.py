"""Generation on the GPU: the decode step replayed from CUDA graphs (one per batch bucket) against the same
graph run eagerly and against Hugging Face greedy generate, and the quantized prefill/decode with the CUDA
kernels against the reference ops on a CPU copy. Skips without a GPU."""
from __future__ import annotations

import copy

import pytest
import torch

import zqcompile as zq
from zqcompile import plugins
from zqcompile.models import tiny_model

from . import require_cuda

pytestmark = pytest.mark.gpu
require_cuda(kernels=False)

DEV = "cuda"
NEW = 30


def ids(batch, length, seed, vocab=1000):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed)).to(DEV)


def eager_decode(engine, monkeypatch):
    """Make the engine's generator run its decode graph without CUDA graphs."""
    gen = engine._generator
    monkeypatch.setattr(gen, "_decode_step", lambda *a: gen.decode(*a)[0])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fp32_greedy_equals_hf_with_cuda_graph_decode(family):
    model = tiny_model(family).to(DEV)
    engine = zq.compile(model, (ids(1, 8, 0),), config="none", generation=zq.CacheSpec(4, 64))
    prompt = ids(1, 12, 1)
    out = engine.generate(prompt, max_new_tokens=NEW)
    assert engine._generator._cuda_decode is not None and 1 in engine._generator._cuda_decode.graphs
    hf = model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(out, hf)


@pytest.mark.parametrize("config", ["none", "w8a8", "w4/8a8"])
def test_cuda_graph_decode_equals_eager_decode_padded_bucket(config, monkeypatch):
    """Batch 3 runs in the bucket of 4 (a zero-mask pad row); tokens equal the eager decode's."""
    model = tiny_model("llama").to(DEV).half()
    engine = zq.compile(model, (ids(1, 8, 0),), config=config, generation=zq.CacheSpec(4, 64))
    prompt = ids(3, 10, 2)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    graphed = engine.generate(prompt, attention_mask=mask, max_new_tokens=NEW)
    assert 4 in engine._generator._cuda_decode.graphs
    eager_decode(engine, monkeypatch)
    eager = engine.generate(prompt, attention_mask=mask, max_new_tokens=NEW)
    assert torch.equal(graphed, eager)


def test_w8a8_prefill_logits_kernels_vs_reference_ops():
    """The quantized prefill graph with the CUDA kernels against the same graph's reference ops on CPU (fp32
    model there: the kernels' fp16 rounding is the only difference)."""
    if not plugins.load():
        pytest.skip(f"CUDA kernel library not built: {plugins.status()}")
    model = tiny_model("llama", hidden=128)
    cpu = zq.compile(copy.deepcopy(model), (ids(1, 8, 0).cpu(),), config="w8a8", generation=zq.CacheSpec(2, 32))
    gpu = zq.compile(model.to(DEV).half(), (ids(1, 8, 0),), config="w8a8", generation=zq.CacheSpec(2, 32))
    prompt = ids(2, 16, 3)
    pos = torch.arange(16, device=DEV).expand(2, 16)
    mask = torch.zeros(2, 32, dtype=torch.long, device=DEV)
    mask[:, :16] = 1
    args = (prompt, pos, torch.arange(16, device=DEV), mask)
    with torch.no_grad():
        y_gpu = gpu._generator.prefill(*args)[0].float().cpu()
        y_cpu = cpu._generator.prefill(*(a.cpu() for a in args))[0].float()
    err = (y_gpu - y_cpu).abs().max().item()
    assert err <= 0.03 * y_cpu.abs().max().item(), err
    assert (y_gpu.argmax(-1) == y_cpu.argmax(-1)).float().mean().item() >= 0.5
