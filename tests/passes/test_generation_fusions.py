"""The generation-graph fusions on hand-built attention blocks (Hugging Face's formulation: rotate-half
rotary embedding, repeat_kv, SDPA with a boolean mask): op counts after the pass and eager numerics."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from zqcompile.capture import capture
from zqcompile.config import get_config
from zqcompile.passes import PassContext, propagate_shapes
from zqcompile.passes.base import aten, calls, zq
from zqcompile.passes.fuse_gqa_attention import fuse_gqa_attention
from zqcompile.passes.fuse_kv_write import fuse_kv_write
from zqcompile.passes.fuse_rotary import fuse_rotary



def rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


class Attn(nn.Module):
    """q/k/v from one projection, rotary embedding, GQA over a cache of length L, boolean mask."""

    def __init__(self, hq=4, hkv=2, d=16, float_mask=False):
        super().__init__()
        self.hq, self.hkv, self.d, self.float_mask = hq, hkv, d, float_mask
        self.qkv = nn.Linear(32, (hq + 2 * hkv) * d)

    def forward(self, x, cos, sin, k_cache, v_cache, mask):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], -1)
        q, k, v = (t.view(b, s, -1, self.d).transpose(1, 2) for t in (q, k, v))
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = torch.cat([k_cache, k], 2)
        v = torch.cat([v_cache, v], 2)
        n = self.hq // self.hkv
        m = torch.where(mask, 0.0, -1e9) if self.float_mask else mask
        return nn.functional.scaled_dot_product_attention(q, repeat_kv(k, n), repeat_kv(v, n), attn_mask=m,
                                                          scale=0.3)


def inputs(b=2, s=3, past=5, hkv=2, d=16):
    g = torch.Generator().manual_seed(0)
    ang = torch.randn(b, s, d // 2, generator=g)
    emb = torch.cat([ang, ang], -1)
    mask = torch.rand(b, 1, s, past + s, generator=g) > 0.3
    mask[..., -1] = True
    return (torch.randn(b, s, 32, generator=g), emb.cos(), emb.sin(), torch.randn(b, hkv, past, d, generator=g),
            torch.randn(b, hkv, past, d, generator=g), mask)


def run(module, args, *passes):
    gm, _ = capture(module.eval(), args, dynamic=(False, False))
    propagate_shapes(gm, args)
    ctx = PassContext(get_config("none"), args)
    ref = gm(*args)
    for p in passes:
        p(gm, ctx)
        gm.recompile()
        propagate_shapes(gm, args)
    return gm, ctx, ref


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 4), (6, 1)])
def test_rotary_and_gqa_attention_fuse_and_match_eager(hq, hkv):
    module, args = Attn(hq, hkv), inputs(hkv=hkv)
    gm, ctx, ref = run(module, args, fuse_rotary, fuse_gqa_attention)
    assert len(calls(gm, zq.rope.default)) == 1 and len(calls(gm, zq.gqa_attention.default)) == 1
    assert not calls(gm, aten.scaled_dot_product_attention.default, aten.neg.default, aten.expand.default)
    torch.testing.assert_close(gm(*args), module(*args), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gm(*args), ref, rtol=1e-5, atol=1e-5)
    assert {f.kind for f in ctx.fusions} == {"rope", "gqa-attention"}


def test_float_mask_attention_is_kept_and_reported():
    module, args = Attn(float_mask=True), inputs()
    gm, ctx, ref = run(module, args, fuse_rotary, fuse_gqa_attention)
    assert len(calls(gm, aten.scaled_dot_product_attention.default)) == 1
    assert not calls(gm, zq.gqa_attention.default)
    assert any(nf.candidate == "gqa_attention" and "boolean" in nf.reason for nf in ctx.not_fused)
    torch.testing.assert_close(gm(*args), ref)


def test_lone_rotary_embedding_is_left_alone():
    class One(nn.Module):
        def forward(self, x, cos, sin):
            return x * cos[:, None] + rotate_half(x) * sin[:, None]

    args = (torch.randn(2, 4, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    gm, ctx, ref = run(One(), args, fuse_rotary)
    assert not calls(gm, zq.rope.default)
    assert any(nf.candidate == "rope" for nf in ctx.not_fused)
    torch.testing.assert_close(gm(*args), ref)


class CachedAttn(nn.Module):
    """Attn with the generation graphs' static cache: k and v written at `slots` of the cache buffers with
    index_copy_ (zqcompile/generation/kv_cache.py), attention over the written cache rows of the batch."""

    def __init__(self, hq=4, hkv=2, d=16, rows=3, length=12, keep_keys=False):
        super().__init__()
        self.attn, self.keep_keys = Attn(hq, hkv, d), keep_keys
        self.register_buffer("k_cache", torch.zeros(rows, hkv, length, d))
        self.register_buffer("v_cache", torch.zeros(rows, hkv, length, d))

    def forward(self, x, cos, sin, slots, mask):
        a, (b, s, _) = self.attn, x.shape
        q, k, v = a.qkv(x).split([a.hq * a.d, a.hkv * a.d, a.hkv * a.d], -1)
        q, k, v = (t.view(b, s, -1, a.d).transpose(1, 2) for t in (q, k, v))
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        self.k_cache[:b].index_copy_(2, slots, k)
        self.v_cache[:b].index_copy_(2, slots, v)
        n = a.hq // a.hkv
        out = nn.functional.scaled_dot_product_attention(q, repeat_kv(self.k_cache[:b], n),
                                                         repeat_kv(self.v_cache[:b], n), attn_mask=mask, scale=0.3)
        return (out, k * 2) if self.keep_keys else out


def cached_inputs(b=2, s=3, length=12, start=4):
    x, cos, sin, *_ = inputs(b, s)
    mask = torch.zeros(b, 1, s, length, dtype=torch.bool)
    mask[..., : start + s] = True
    return x, cos, sin, torch.arange(start, start + s), mask


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 4)])
def test_rotary_and_cache_write_fuse_and_match_eager(hq, hkv):
    """One zq.rope_kv_write a layer in place of zq.rope + two index_copy_: same output and same cache rows
    (the other rows and slots untouched) as the eager module."""
    module, args = CachedAttn(hq, hkv), cached_inputs()
    gm, _ = capture(module.eval(), args, dynamic=(False, False))
    propagate_shapes(gm, args)
    ctx = PassContext(get_config("none"), args)
    for p in (fuse_rotary, fuse_kv_write, fuse_gqa_attention):
        p(gm, ctx)
        gm.recompile()
        propagate_shapes(gm, args)
    assert len(calls(gm, zq.rope_kv_write.default)) == 1
    assert not calls(gm, zq.rope.default, aten.index_copy_.default)
    assert "rope-kv-write" in {f.kind for f in ctx.fusions}
    ref = CachedAttn(hq, hkv)
    ref.load_state_dict(module.state_dict())
    with torch.no_grad():  # both caches poisoned: only the written slots may change, the others stay 1e4
        for buf in (*ref.buffers(), *gm.buffers()):
            buf.fill_(1e4)
        mask = args[4].clone()
        mask[..., :4] = False  # attend only the slots written now
        got, want = gm(*args[:4], mask), ref(*args[:4], mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, buf in gm.named_buffers():
        torch.testing.assert_close(buf, getattr(ref, name.rsplit(".", 1)[-1]), rtol=1e-6, atol=1e-6)
    assert (ref.k_cache[:2, :, 4:7] != 1e4).all() and (ref.k_cache[:, :, 7:] == 1e4).all()


def test_cache_write_with_keys_read_elsewhere_is_kept_and_reported():
    module, args = CachedAttn(keep_keys=True), cached_inputs()
    gm, ctx, ref = run(module, args, fuse_rotary, fuse_kv_write)
    assert calls(gm, zq.rope.default) and len(calls(gm, aten.index_copy_.default)) == 2
    assert any(nf.candidate == "rope-kv-write" and "more than their cache write" in nf.reason for nf in ctx.not_fused)
