"""zq.rope_kv_write on CUDA: the fused kernel (zq_rope_kv: RoPE of q and k and the KV-cache write of k and v
in one launch, `rope_kv_path = "fused"`) against the split path it replaces (the zq_rope kernel, then two
index_copy_: bit for bit, the same per-element arithmetic) and the fp32 reference. q / k / v are the strided
head views of a fused QKV GEMM output, the caches the first b rows of larger buffers poisoned first (slots not
written must keep the poison, rows past b too); prefill (s > 1) and decode (s = 1) slots; fp16, bf16, fp32;
head dims 64 / 128 / 6; a slot past the cache is not written. Also: greedy generation with the fused path equals
the split path's tokens (tiny Llama, CUDA graphs). Runs on a CUDA machine with the library built; skips
elsewhere. Not yet run on a GPU (written in a session without one): the default stays "split" until it is."""
from __future__ import annotations

import pytest
import torch

import zqcompile  # noqa: F401  registers the zq ops

from . import require_cuda

pytestmark = pytest.mark.gpu
require_cuda()

from zqcompile.plugins import cuda  # noqa: E402

from .test_attention_kernels import ROPE_RTOL, qkv_heads, rope_ref, rotary  # noqa: E402

DEV = "cuda"


def caches(b, hkv, l, d, dtype):
    """k / v caches: the first b rows of [b + 1, hkv, l, d] buffers filled with a poison value."""
    bufs = [torch.full((b + 1, hkv, l, d), 1234.0, device=DEV, dtype=dtype) for _ in range(2)]
    return bufs, [t[:b] for t in bufs]


def run(path, monkeypatch, q, k, v, cos, sin, slots, l):
    monkeypatch.setattr(cuda, "rope_kv_path", path)
    b, hkv, _, d = k.shape
    bufs, (kc, vc) = caches(b, hkv, l, d, q.dtype)
    key = "rope_kv" if path == "fused" else "rope_kv_split"
    before = cuda.attention_paths[key]
    q_out = torch.ops.zq.rope_kv_write(q, k, v, cos, sin, kc, vc, slots)
    assert cuda.attention_paths[key] == before + 1, f"the {path} path did not run"
    return q_out, bufs


@pytest.mark.parametrize("dtype,d", [(torch.float16, 128), (torch.bfloat16, 64), (torch.float32, 6)])
@pytest.mark.parametrize("hq,hkv", [(32, 8), (4, 4), (9, 3)])
@pytest.mark.parametrize("b,s,start", [(1, 1, 0), (3, 1, 17), (2, 7, 0), (1, 130, 5)])
def test_fused_equals_split_and_the_reference(monkeypatch, dtype, d, hq, hkv, b, s, start):
    q, k, v = qkv_heads(b, s, hq, hkv, d, dtype, seed=b * 100 + s + d)
    l = start + s + 3
    positions = torch.arange(start, start + s, device=DEV)[None].expand(b, s)
    cos, sin = rotary(positions, d, dtype)
    slots = torch.arange(start, start + s, device=DEV)
    q_f, bufs_f = run("fused", monkeypatch, q, k, v, cos, sin, slots, l)
    q_s, bufs_s = run("split", monkeypatch, q, k, v, cos, sin, slots, l)
    assert q_f.is_contiguous() and q_f.shape == q.shape and q_f.dtype == dtype
    assert torch.equal(q_f, q_s)
    for f, sp in zip(bufs_f, bufs_s):
        assert torch.equal(f, sp)
    q_ref, k_ref = rope_ref(q, k, cos, sin)
    torch.testing.assert_close(q_f.float(), q_ref, rtol=ROPE_RTOL[dtype], atol=1e-4)
    kc, vc = bufs_f
    torch.testing.assert_close(kc[:b, :, start:start + s].float(), k_ref, rtol=ROPE_RTOL[dtype], atol=1e-4)
    assert torch.equal(vc[:b, :, start:start + s], v)
    for t in (kc, vc):  # every slot not written keeps the poison: other positions, and the rows past b
        untouched = torch.ones_like(t, dtype=torch.bool)
        untouched[:b, :, start:start + s] = False
        assert (t[untouched] == 1234.0).all()


def test_slot_past_the_cache_is_not_written(monkeypatch):
    q, k, v = qkv_heads(2, 2, 4, 2, 64, torch.float16, seed=5)
    cos, sin = rotary(torch.tensor([[3, 9]], device=DEV).expand(2, 2), 64, torch.float16)
    _, (kc, vc) = run("fused", monkeypatch, q, k, v, cos, sin, torch.tensor([3, 9], device=DEV), 8)
    assert (kc[:2, :, 3] != 1234.0).all() and (kc[:, :, 4:] == 1234.0).all() and (vc[:, :, 4:] == 1234.0).all()


@pytest.mark.parametrize("config", ["none", "w8a8"])
def test_generation_with_the_fused_path_gives_the_split_paths_tokens(monkeypatch, config):
    import zqcompile as zq
    from zqcompile.models import tiny_model
    model = tiny_model("llama", hidden=128).to(DEV, torch.float16)
    ids = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEV)
    engine = zq.compile(model, (ids,), config, generation=zq.CacheSpec(2, 64))
    tokens = {}
    for path in ("split", "fused"):
        monkeypatch.setattr(cuda, "rope_kv_path", path)
        engine.prepare_generation().reset_runners()  # CUDA graphs captured again on this path
        before = cuda.attention_paths["rope_kv" if path == "fused" else "rope_kv_split"]
        tokens[path] = engine.generate(ids, max_new_tokens=16)
        assert cuda.attention_paths["rope_kv" if path == "fused" else "rope_kv_split"] > before
    assert torch.equal(tokens["fused"], tokens["split"])
