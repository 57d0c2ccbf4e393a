"""The RoPE and decode-attention kernels of libzq_kernels.so (zq::rope, zq::gqa_attention on CUDA) against the
reference math of ops/quant_math computed in fp32. q / k / v are the strided head views of a fused QKV GEMM
output, the cache a batch slice of a larger buffer, the masks left-padded with a row of one slot; outputs are
poisoned (NaN / 0xFF) first so unwritten elements fail. Runs on a CUDA machine with the library built
(`cmake -S . -B build && cmake --build build -j`); skips elsewhere."""
from __future__ import annotations

import pytest
import torch

import zqcompile  # noqa: F401  registers the zq ops
from zqcompile.ops import quant_math as qm

from . import require_cuda

pytestmark = pytest.mark.gpu
require_cuda()

from zqcompile.plugins import cuda  # noqa: E402

from .test_kernels import assert_close, poison  # noqa: E402  (same skip conditions as this module)

DEV = "cuda"
HALVES = [torch.float16, torch.bfloat16]
HEADS = [(9, 3), (4, 4), (32, 8)]  # (query heads, KV heads): SmolLM2-135M, MHA, Llama-3-8B
# Kernels round once from fp32: within half an ulp of the fp32 reference (plus fp32 summation order).
ROPE_RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}
ATTN_REL = {torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}


def qkv_heads(b, s, hq, hkv, d, dtype, seed):
    """q [b, hq, s, d], k / v [b, hkv, s, d]: the transposed head views of one [b, s, (hq + 2 hkv) d] GEMM
    output (non-contiguous: head stride d, position stride (hq + 2 hkv) d), an outlier key channel."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    qkv = torch.randn((b, s, (hq + 2 * hkv) * d), generator=g, device=DEV)
    qkv[..., hq * d + 3: (hq + hkv) * d: d] *= 8.0
    q, k, v = qkv.to(dtype).split([hq * d, hkv * d, hkv * d], dim=-1)
    return tuple(t.view(b, s, h, d).transpose(1, 2) for t, h in ((q, hq), (k, hkv), (v, hkv)))


def rotary(positions, d, dtype):
    """cos, sin [B, 1, S, D] as Hugging Face's rotary embedding builds them (fp32, cast to the model dtype)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=DEV, dtype=torch.float32) / d))
    emb = (positions[..., None].float() * inv_freq).repeat(1, 1, 2)
    return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


def decode_mask(b, l):
    """[b, 1, 1, l] bool as the decode graph builds it: left pads, the row's tokens, then slots not yet
    written; the last row (when b > 1) may attend to a single slot."""
    m = torch.zeros((b, l), dtype=torch.bool)
    for i in range(b):
        pad = (7 * i) % max(l // 3, 1)
        end = l - (i % 3) * (l // 4)
        m[i, pad:end] = True
    if b > 1:
        m[-1] = False
        m[-1, l // 2] = True
    return m.to(DEV)[:, None, None, :]


def cache(b, hkv, l, d, dtype, seed):
    """k / v [b, hkv, l, d]: the first b rows of a larger preallocated cache buffer."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    buf = torch.randn((b + 2, hkv, l, d), generator=g, device=DEV)
    buf[..., 5] *= 4.0
    return buf.to(dtype)[:b]


def rope_ref(q, k, cos, sin):
    return tuple(qm.rope(x.float(), cos.float(), sin.float()) for x in (q, k))


def attention_ref(q, k, v, mask, scale):
    return qm.gqa_attention(q.float(), k.float(), v.float(), mask, scale)


# ---- RoPE ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("b,s", [(1, 1), (3, 1), (32, 1), (3, 7), (1, 178)])
def test_rope(dtype, d, hq, hkv, b, s):
    q, k, _ = qkv_heads(b, s, hq, hkv, d, dtype, seed=b * 100 + s + d)
    assert b * s == 1 or (not q.is_contiguous() and not k.is_contiguous())  # one token: the view is contiguous
    positions = torch.arange(s, device=DEV)[None] + torch.arange(b, device=DEV)[:, None] * 5
    cos, sin = rotary(positions, d, dtype)
    poison()
    before = cuda.attention_paths["rope"]
    q_out, k_out = torch.ops.zq.rope(q, k, cos, sin)
    assert cuda.attention_paths["rope"] == before + 1
    assert q_out.is_contiguous() and k_out.is_contiguous()
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == k_out.dtype == dtype
    for out, exp in zip((q_out, k_out), rope_ref(q, k, cos, sin)):
        assert not torch.isnan(out).any(), "NaN in output (an element left unwritten?)"
        torch.testing.assert_close(out.float(), exp, rtol=ROPE_RTOL[dtype], atol=1e-4)


def test_rope_fp32_broadcast_cos_and_odd_head_dim():
    """fp32, D = 6 (not a multiple of 8), cos / sin [1, 1, S, D] shared by the batch."""
    b, s, hq, hkv, d = 2, 5, 4, 2, 6
    q, k, _ = qkv_heads(b, s, hq, hkv, d, torch.float32, seed=7)
    cos, sin = rotary(torch.arange(s, device=DEV)[None], d, torch.float32)
    poison()
    before = cuda.attention_paths["rope"]
    q_out, k_out = torch.ops.zq.rope(q, k, cos, sin)
    assert cuda.attention_paths["rope"] == before + 1
    for out, exp in zip((q_out, k_out), rope_ref(q, k, cos.expand(b, -1, -1, -1), sin.expand(b, -1, -1, -1))):
        torch.testing.assert_close(out, exp, rtol=ROPE_RTOL[torch.float32], atol=1e-6)


def test_rope_mixed_dtypes_fall_back_to_reference():
    q, k, _ = qkv_heads(2, 1, 4, 2, 64, torch.float16, seed=3)
    cos, sin = rotary(torch.arange(1, device=DEV)[None].expand(2, 1), 64, torch.float32)
    before = cuda.attention_paths["rope_reference"]
    got = torch.ops.zq.rope(q, k, cos, sin)
    assert cuda.attention_paths["rope_reference"] == before + 1
    for g, e in zip(got, cuda._ref("rope")(q, k, cos, sin)):
        assert torch.equal(g, e)


# ---- decode attention ----------------------------------------------------------------------------------
def run_decode(dtype, d, hq, hkv, b, l, seed):
    q, _, _ = qkv_heads(b, 1, hq, hkv, d, dtype, seed=seed)
    k, v = cache(b, hkv, l, d, dtype, seed=seed + 1), cache(b, hkv, l, d, dtype, seed=seed + 2)
    mask = decode_mask(b, l)
    scale = d ** -0.5
    poison()
    before = cuda.attention_paths["decode_attention"]
    out = torch.ops.zq.gqa_attention(q, k, v, mask, scale)
    assert cuda.attention_paths["decode_attention"] == before + 1, "the decode kernel did not run"
    assert out.shape == (b, hq, 1, d) and out.dtype == dtype
    assert_close(out, attention_ref(q, k, v, mask, scale), rel=ATTN_REL[dtype])


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("b", [1, 3, 32])
@pytest.mark.parametrize("l", [1, 7, 178, 4096])
def test_decode_attention(dtype, d, hq, hkv, b, l):
    run_decode(dtype, d, hq, hkv, b, l, seed=b * 1000 + l + d + hq)


@pytest.mark.parametrize("dtype,d,l", [(torch.float32, 64, 178), (torch.float16, 8, 33), (torch.bfloat16, 96, 300),
                                       (torch.float16, 256, 520), (torch.float16, 64, 32768)])
def test_decode_attention_other_shapes(dtype, d, l):
    """fp32; head dims 8, 96 (lanes past the head), 256; a cache whose scores need opt-in shared memory."""
    run_decode(dtype, d, 9, 3, 3, l, seed=d + l)


def test_decode_attention_row_without_slots_is_zero():
    b, hq, hkv, l, d = 3, 9, 3, 50, 64
    q, _, _ = qkv_heads(b, 1, hq, hkv, d, torch.float16, seed=11)
    k, v = cache(b, hkv, l, d, torch.float16, seed=12), cache(b, hkv, l, d, torch.float16, seed=13)
    mask = decode_mask(b, l)
    mask[1] = False
    poison()
    out = torch.ops.zq.gqa_attention(q, k, v, mask, d ** -0.5)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    keep = [0, 2]
    assert_close(out[keep], attention_ref(q[keep], k[keep], v[keep], mask[keep], d ** -0.5), rel=5e-3)


def test_attention_outside_the_kernel_contract_runs_the_reference():
    """Several query tokens (prefill), a per-head mask, and a cache slice the 16-byte loads cannot read (the
    kernel declines it) are answered by the reference implementation."""
    b, hq, hkv, l, d = 2, 4, 2, 40, 64
    q, _, _ = qkv_heads(b, 3, hq, hkv, d, torch.float16, seed=21)
    k, v = cache(b, hkv, l, d, torch.float16, seed=22), cache(b, hkv, l, d, torch.float16, seed=23)
    causal = torch.ones((3, l), dtype=torch.bool, device=DEV).tril(diagonal=l - 3)
    misaligned = torch.empty(k.numel() + 1, dtype=k.dtype, device=DEV)[1:].view(k.shape).copy_(k)
    q1 = q[:, :, :1]
    cases = [(q, k, v, causal[None, None].expand(b, 1, 3, l)),
             (q1, k, v, decode_mask(b, l).expand(b, hq, 1, l)),
             (q1, misaligned, v, decode_mask(b, l))]
    for qi, ki, vi, mi in cases:
        before = cuda.attention_paths["gqa_attention_reference"]
        got = torch.ops.zq.gqa_attention(qi, ki, vi, mi, 0.125)
        assert cuda.attention_paths["gqa_attention_reference"] == before + 1
        assert torch.equal(got, cuda._ref("gqa_attention")(qi, ki, vi, mi, 0.125))


def test_decode_attention_all_scores_very_negative():
    """Every score far below zero: the softmax max must be the true max (not 0), or exp underflows to 0/0."""
    b, hq, hkv, l, d = 2, 4, 2, 40, 64
    q = torch.ones(b, hq, 1, d, device=DEV, dtype=torch.float16)
    k = -torch.rand(b, hkv, l, d, device=DEV, dtype=torch.float16) - 1.0
    v = cache(b, hkv, l, d, torch.float16, seed=14)
    mask = decode_mask(b, l)
    out = torch.ops.zq.gqa_attention(q, k, v, mask, 4.0)  # scores ~ -4 * 64 * 1.5
    assert_close(out, attention_ref(q, k, v, mask, 4.0), rel=5e-3)
