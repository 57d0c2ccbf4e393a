"""The split-L (flash-decoding) decode attention of libzq_kernels.so (zq_decode_attention_split: blocks per
(split, KV head, batch row) with every query head of the group, then a combine kernel) against the fp32
reference gqa_attention of ops/quant_math: odd cache lengths (1, 7, 129, 4097, 8191), batch 1 and 3, GQA 32/8
and MHA 4/4, head dims 64 and 128, fp16 and bf16, outputs poisoned first; forced split counts (one split, many
splits, more splits than attended slots), rows with nothing attended, the old single-block path kept for A/B
(and handing long caches to split-L, never to the reference), and capture in a CUDA graph (the workspace).
Runs on a CUDA machine with the library built; skips elsewhere."""
from __future__ import annotations

import pytest
import torch

import zqcompile  # noqa: F401  registers the zq ops

from . import require_cuda

pytestmark = pytest.mark.gpu
require_cuda()

from zqcompile.plugins import cuda  # noqa: E402

from .test_attention_kernels import ATTN_REL, HALVES, attention_ref, cache, decode_mask, qkv_heads  # noqa: E402
from .test_kernels import assert_close, poison  # noqa: E402


@pytest.fixture
def attention_path(monkeypatch):
    """set(path, splits): the decode-attention path and forced split count for one test."""
    def set_(path: str = "split", splits: int = 0):
        monkeypatch.setattr(cuda, "decode_attention_path", path)
        monkeypatch.setattr(cuda, "decode_attention_splits", splits)
    return set_


def inputs(dtype, d, hq, hkv, b, l, seed):
    q, _, _ = qkv_heads(b, 1, hq, hkv, d, dtype, seed=seed)
    k, v = cache(b, hkv, l, d, dtype, seed=seed + 1), cache(b, hkv, l, d, dtype, seed=seed + 2)
    return q, k, v, decode_mask(b, l)


def expected_splits(l, splits, group):
    """The count a forced request gets (zq/attention.h): chunks of ceil(l / splits) slots rounded up to 16,
    at most 1024 (and 32 KB of fp32 scores for the group)."""
    chunk = -(-(-(-l // splits)) // 16) * 16
    cap = min(1024, max(16, (8192 // group) // 16 * 16))
    return -(-l // min(chunk, cap))


def run(q, k, v, mask, scale, expect="split"):
    poison()
    before = cuda.attention_paths[f"decode_attention_{expect}"]
    out = torch.ops.zq.gqa_attention(q, k, v, mask, scale)
    assert cuda.attention_paths[f"decode_attention_{expect}"] == before + 1, f"the {expect} kernel did not run"
    assert out.shape == q.shape and out.dtype == q.dtype
    return out


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", [(32, 8), (4, 4)])
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("l", [1, 7, 129, 4097, 8191])
def test_split_attention(attention_path, dtype, d, hq, hkv, b, l):
    attention_path("split")
    q, k, v, mask = inputs(dtype, d, hq, hkv, b, l, seed=b * 1000 + l + d + hq)
    out = run(q, k, v, mask, d ** -0.5)
    assert_close(out, attention_ref(q, k, v, mask, d ** -0.5), rel=ATTN_REL[dtype])


@pytest.mark.parametrize("splits", [1, 2, 5, 64, 100000])
@pytest.mark.parametrize("l", [129, 4097])
def test_forced_split_counts(attention_path, splits, l):
    """One split (no combine), a few, many, and more than the slots (16-slot chunks, most of them masked)."""
    attention_path("split", splits)
    q, k, v, mask = inputs(torch.float16, 128, 32, 8, 3, l, seed=splits + l)
    assert cuda._lib.zq_decode_attention_splits(3, 32, 8, l, splits) == expected_splits(l, splits, 4)
    out = run(q, k, v, mask, 0.088)
    assert_close(out, attention_ref(q, k, v, mask, 0.088), rel=ATTN_REL[torch.float16])


def test_chosen_splits_fill_the_gpu():
    """Auto choice: batch 1 at a long cache splits the cache over about 2 blocks per SM; a large batch at a
    short cache does not split (no combine kernel); a split never exceeds 1024 slots."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n = cuda._lib.zq_decode_attention_splits(1, 32, 8, 4096, 0)
    assert 8 * n >= sms and 4096 / n >= 32
    assert cuda._lib.zq_decode_attention_splits(64, 32, 8, 128, 0) == 1
    assert cuda._lib.zq_decode_attention_splits(64, 32, 8, 65536, 0) >= 64
    assert cuda._lib.zq_decode_attention_workspace_bytes(64, 32, 8, 128, 128, 0) == 0


@pytest.mark.parametrize("dtype,d,hq,hkv", [(torch.float32, 64, 9, 3), (torch.float16, 8, 9, 3),
                                            (torch.bfloat16, 96, 12, 2), (torch.float16, 256, 32, 8),
                                            (torch.float16, 128, 32, 1)])
def test_split_attention_other_shapes(attention_path, dtype, d, hq, hkv):
    """fp32; head dims 8, 96 (lanes past the head), 256; groups of 3, 6 (two passes over V) and 32 (MQA: a
    group whose scores cap the chunk)."""
    attention_path("split")
    q, k, v, mask = inputs(dtype, d, hq, hkv, 3, 3001, seed=d + hq)
    out = run(q, k, v, mask, d ** -0.5)
    assert_close(out, attention_ref(q, k, v, mask, d ** -0.5), rel=ATTN_REL[dtype])


@pytest.mark.parametrize("splits", [1, 7])
def test_rows_without_slots_are_zero(attention_path, splits):
    """A row attending to nothing is zeros; with several splits, chunks wholly masked contribute nothing."""
    attention_path("split", splits)
    q, k, v, mask = inputs(torch.float16, 64, 32, 8, 3, 500, seed=31)
    mask[1] = False
    mask[2] = False
    mask[2, ..., 499] = True  # one slot, in the last split
    out = run(q, k, v, mask, 0.125)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    keep = [0, 2]
    assert_close(out[keep], attention_ref(q[keep], k[keep], v[keep], mask[keep], 0.125), rel=5e-3)


def test_single_block_path_for_ab(attention_path):
    """path "single": the one-block kernel at a short cache; a cache past its shared memory goes to split-L
    (never the reference); both agree with the reference and with each other to fp16 rounding."""
    q, k, v, mask = inputs(torch.float16, 128, 32, 8, 2, 300, seed=41)
    attention_path("single")
    single = run(q, k, v, mask, 0.088, expect="single")
    attention_path("split")
    split = run(q, k, v, mask, 0.088)
    ref = attention_ref(q, k, v, mask, 0.088)
    assert_close(single, ref, rel=5e-3)
    assert_close(split, ref, rel=5e-3)
    attention_path("single")
    ql, kl, vl, ml = inputs(torch.float16, 64, 4, 4, 1, 70000, seed=42)
    before = cuda.attention_paths["gqa_attention_reference"]
    out = run(ql, kl, vl, ml, 0.125, expect="split")
    assert cuda.attention_paths["gqa_attention_reference"] == before
    assert_close(out, attention_ref(ql, kl, vl, ml, 0.125), rel=5e-3)


def captured(q, k, v, mask, scale):
    """gqa_attention captured in a CUDA graph (after a warm-up on a side stream): (graph, its output)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.ops.zq.gqa_attention(q, k, v, mask, scale)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = torch.ops.zq.gqa_attention(q, k, v, mask, scale)
    return g, out


def test_split_attention_in_a_cuda_graph(attention_path):
    """Captured with its workspace and combine kernel, replayed on new cache contents."""
    attention_path("split")
    q, k, v, mask = inputs(torch.float16, 128, 32, 8, 3, 4097, seed=51)
    g, out = captured(q, k, v, mask, 0.088)
    k.copy_(cache(3, 8, 4097, 128, torch.float16, seed=52))
    g.replay()
    torch.cuda.synchronize()
    assert_close(out, attention_ref(q, k, v, mask, 0.088), rel=ATTN_REL[torch.float16])


@pytest.fixture
def merge():
    """merge("cluster" | "kernel"): where split-L merges 2-8 splits, for one test."""
    with cuda.switched("attention_merge", cuda.attention_merge):
        yield cuda.set_attention_merge


def cluster_merges(n_splits):
    return 2 <= n_splits <= 8 and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.parametrize("splits", [2, 5, 8, 9])
@pytest.mark.parametrize("dtype,d,hq,hkv,b,l", [(torch.float16, 128, 32, 8, 1, 200),
                                               (torch.bfloat16, 64, 4, 4, 3, 4097),
                                               (torch.float16, 128, 32, 8, 2, 33)])
def test_merge_in_the_cluster_matches_the_combine_kernel(attention_path, merge, splits, dtype, d, hq, hkv, b, l):
    """The same states merged in the cluster (no workspace) and by the combine kernel (through the workspace),
    both against the fp32 reference; a chunk wholly masked (the decode mask's padding) contributes nothing."""
    attention_path("split", splits)
    q, k, v, mask = inputs(dtype, d, hq, hkv, b, l, seed=splits * 10 + l)
    n = cuda._lib.zq_decode_attention_splits(b, hq, hkv, l, splits)
    expect = attention_ref(q, k, v, mask, d ** -0.5)
    outs = {}
    for where in ("kernel", "cluster"):
        merge(where)
        nbytes = cuda._lib.zq_decode_attention_workspace_bytes(b, hq, hkv, l, d, splits)
        assert (nbytes == 0) == (n == 1 or (where == "cluster" and cluster_merges(n))), (where, n, nbytes)
        outs[where] = run(q, k, v, mask, d ** -0.5)
        assert_close(outs[where], expect, rel=ATTN_REL[dtype])
    assert_close(outs["cluster"], outs["kernel"], rel=ATTN_REL[dtype])


def test_short_caches_take_at_most_8_splits_merged_in_the_cluster(merge):
    """Auto choice on sm_90: batch 1 at a cache of <= 512 slots takes <= 8 splits (one cluster, no combine kernel);
    with the combine kernel forced, the count is the SM-filling one (up to one split per 32 slots)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the cluster merge needs sm_90")
    merge("cluster")
    assert cuda._lib.zq_decode_attention_splits(1, 32, 8, 300, 0) <= 8
    assert cuda._lib.zq_decode_attention_workspace_bytes(1, 32, 8, 300, 128, 0) == 0
    assert cuda._lib.zq_decode_attention_splits(1, 32, 8, 4096, 0) > 8  # long caches: many splits, combine kernel
    merge("kernel")
    assert cuda._lib.zq_decode_attention_splits(1, 32, 8, 300, 0) == 10


def test_cluster_merge_in_a_cuda_graph(attention_path, merge):
    """Captured with the cluster merge (no workspace), replayed on new cache contents and a longer mask."""
    attention_path("split")
    merge("cluster")
    b, l = 2, 256
    q, k, v, mask = inputs(torch.float16, 128, 32, 8, b, l, seed=61)
    g, out = captured(q, k, v, mask, 0.088)
    for i in range(3):
        k.copy_(cache(b, 8, l, 128, torch.float16, seed=62 + i))
        mask.copy_(decode_mask(b, l))
        mask[..., : 60 * i] = False
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert_close(out, attention_ref(q, k, v, mask, 0.088), rel=ATTN_REL[torch.float16])


def test_long_caches_split_finer(merge):
    """Auto choice past 512 slots with no more (row, KV head) pairs than SMs: at least 16 splits of >= 64 slots
    (4 blocks an SM in one wave); a short cache or many pairs keeps about 2 blocks an SM."""
    merge("cluster")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for b, l in ((1, 2048), (1, 8192), (4, 2048), (16, 4096)):
        n = cuda._lib.zq_decode_attention_splits(b, 32, 8, l, 0)
        assert n >= 16 and l / n >= 64, (b, l, n)
    n = cuda._lib.zq_decode_attention_splits(4, 32, 8, 8192, 0)
    assert n == max(16, 4 * sms // 32) and 32 * n <= max(4 * sms, 32 * 16)  # one wave of 4 blocks an SM
    assert cuda._lib.zq_decode_attention_splits(16, 32, 8, 512, 0) == -(-2 * sms // 128)
    assert cuda._lib.zq_decode_attention_splits(64, 32, 8, 2048, 0) <= 2

