"""GPU memory of an engine: what it holds after compile is the bytes its graphs read (each constant once)
plus its KV cache and a little workspace, the float model can be dropped, and deleting the engine frees it
all. Skips without a GPU."""
from __future__ import annotations

import gc

import pytest
import torch
import transformers as T

import zqcompile as zq

from . import require_cuda

pytestmark = pytest.mark.gpu
require_cuda(kernels=False)

MiB = 1 << 20


def _model():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=4000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    return T.LlamaForCausalLM(cfg).eval().to("cuda", torch.float16)


@pytest.mark.parametrize("config", ["w8a8", "w4/8a8"])
def test_engine_holds_what_its_graphs_read_and_frees_it_when_deleted(config):
    from zqcompile.runtime.cuda_graphs import side_stream
    a = torch.randn(64, 64, device="cuda", dtype=torch.float16)
    side = side_stream(a.device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # cuBLAS's per-stream workspaces exist before the baseline: torch keeps them
        a @ a
    torch.cuda.current_stream().wait_stream(side)
    a @ a
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):  # ... and the capture stream's
        a @ a
    del g
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    model = _model()
    model_bytes = torch.cuda.memory_allocated() - base
    ids = torch.randint(0, 4000, (2, 16), device="cuda")
    engine = zq.compile(model, (ids,), config, generation=zq.CacheSpec(4, 128))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated() - base
    need = engine.memory_bytes()  # every constant of every graph once, the KV cache included
    print(f"model {model_bytes / MiB:.1f} MiB, engine needs {need / MiB:.1f}, holds {held / MiB:.1f}, compile peak "
          f"{engine.record.memory['gpu_peak_above_start_bytes'] / MiB:.1f} above the model")
    assert need < 0.75 * model_bytes, (need, model_bytes)  # INT8/INT4 GEMM weights, FP16 embeddings
    assert held <= 1.1 * need + 16 * MiB, (held / MiB, need / MiB)
    peak = engine.record.memory["gpu_peak_above_start_bytes"]
    assert peak <= 1.2 * need + 64 * MiB, (peak / MiB, need / MiB)  # compile peak above the model
    out = engine.generate(ids[:1, :8], max_new_tokens=8)
    assert out.shape == (1, 16)
    del engine, out
    gc.collect()
    torch.cuda.empty_cache()
    left = torch.cuda.memory_allocated() - base
    assert left <= 8 * MiB, left / MiB  # CUDA graphs, cache and weights all gone
