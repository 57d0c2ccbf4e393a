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
