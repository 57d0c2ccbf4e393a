"""Programmatic dependent launch (plugins_cuda/include/zq/launch.cuh): with it on (the default on sm_90) each of
the library's kernels is scheduled while the kernel ahead of it finishes and waits for it on the device. The
results must not change: a W8A8 / W4/8A8 / FP8 LLaMA-shaped model (prefill at M = 384 on the Hopper GEMMs, decode
at batch 4 on the decode kernels, both from CUDA graphs and eagerly) gives the same logits and tokens bit for bit
with PDL off and on, interleaved (off, on, off, on) in one process. Skips without a GPU or the kernel library."""
from __future__ import annotations

import pytest
import torch

import zqcompile as zq

from . import require_cuda

pytestmark = pytest.mark.gpu
require_cuda()

from zqcompile.plugins import cuda  # noqa: E402 - after the skip: the library is loaded

DEV = "cuda"
VOCAB = 2048


def llama():
    import transformers as T
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    return T.LlamaForCausalLM(cfg).to(DEV).half().eval()


def ids(batch, length, seed):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed)).to(DEV)


@pytest.fixture
def pdl():
    """set_pdl(mode) for the test, the default back afterwards."""
    before = cuda.pdl_mode
    yield cuda.set_pdl
    cuda.set_pdl(before)


@pytest.mark.parametrize("config", ["w8a8", "w4/8a8", "fp8"])
def test_outputs_with_pdl_equal_outputs_without(config, pdl):
    if config == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9+")
    engine = zq.compile(llama(), (ids(1, 16, 0),), config=config, generation=zq.CacheSpec(4, 160))
    engine.cuda_graphs = False  # the forward runs eagerly (kernels launched one by one on the stream)
    prompt, gen_prompt = ids(4, 96, 1), ids(4, 64, 2)
    logits, tokens = [], []
    for mode in (0, -1, 0, -1):
        pdl(mode)
        engine._generator.reset_runners()  # prefill / decode graphs captured under this mode
        with torch.no_grad():
            logits.append(engine(prompt).logits.float().cpu())
        tokens.append(engine.generate(gen_prompt, max_new_tokens=48).cpu())
        assert engine._generator._cuda_decode is not None  # the decode steps ran from CUDA graphs
    assert torch.isfinite(logits[0]).all()
    for i in range(1, 4):
        assert torch.equal(logits[i], logits[0]), f"prefill logits differ (run {i}, PDL {'on' if i % 2 else 'off'})"
        assert torch.equal(tokens[i], tokens[0]), f"generated tokens differ (run {i})"
