"""ZeroQuant-HERO's quantized attention (QuantConfig.attention, passes/quantize_attention.py): the reference op
against float attention and its own contract (GQA, bool / additive / causal masks, unused cache slots, rows that
attend nothing), the pass on a tiny SDPA module against eager numerics, and whole engines (encoder and
generation, CPU reference ops) against the Hugging Face model run with the same quantized attention in eager."""
from __future__ import annotations

from dataclasses import replace
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zqcompile as zq
from zqcompile.config import AttentionQuant, ConfigError, QuantConfig, get_config
from zqcompile.generation.kv_cache import CacheSpec
from zqcompile.models import tiny_model
from zqcompile.ops import quant_math as qm
from zqcompile.passes import PassContext
from zqcompile.passes.quantize_attention import quantize_attention

from ..conftest import ids as make_ids
from .helpers import captured, count, run_until

zqops = torch.ops.zq


def qkv(b=2, hq=4, hkv=2, s=8, l=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, s, d, generator=g), torch.randn(b, hkv, l, d, generator=g),
            torch.randn(b, hkv, l, d, generator=g))


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("fp8,tol", [(False, 0.02), (True, 0.06)])
def test_reference_close_to_float_attention_with_gqa_and_masks(fp8, tol, per_token):
    q, k, v = qkv()
    mask = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    got = qm.quant_attention(q, k, v, mask, 16 ** -0.5, False, fp8, per_token)
    assert rel(got, want) < tol
    # the same attention with the KV heads repeated (one group) and with the mask as an additive float mask
    rep = qm.quant_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), mask, 16 ** -0.5, False, fp8,
                             per_token)
    assert torch.equal(rep, got)
    add = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    assert torch.equal(qm.quant_attention(q, k, v, add, 16 ** -0.5, False, fp8, per_token), got)


def test_per_token_scales_follow_each_token_and_channel():
    """granularity "token": an outlier token of K, or an outlier channel of V, costs the other tokens / channels
    nothing (per-head scales lose their resolution)."""
    q, k, v = qkv(b=1, hq=2, hkv=2, s=4, l=16, d=16, seed=0)
    k_out, v_out = k.clone(), v.clone()
    k_out[:, :, 3] *= 50  # one outlier key token
    v_out[..., 5] *= 50  # one outlier value channel
    for kk, vv in ((k_out, v), (k, v_out)):
        want = F.scaled_dot_product_attention(q, kk, vv, scale=0.25)
        head = rel(qm.quant_attention(q, kk, vv, None, 0.25, False, False, False), want)
        token = rel(qm.quant_attention(q, kk, vv, None, 0.25, False, False, True), want)
        assert token < head / 2 and token < 0.015, (token, head)


def test_reference_causal_equals_an_explicit_lower_triangle_and_decode_offset():
    q, k, v = qkv(s=3, l=8)
    tri = torch.ones(3, 8, dtype=torch.bool).tril(5)[None, None]
    assert torch.equal(qm.quant_attention(q, k, v, None, 0.25, True, False),
                       qm.quant_attention(q, k, v, tri, 0.25, False, False))


def test_unattended_cache_slots_set_no_scale_and_empty_rows_give_zeros():
    """A preallocated cache: slots no query attends may hold anything; they change neither the scales nor the
    result. A row that attends nothing is zeros (the decode kernels' convention)."""
    q, k, v = qkv(b=1, s=1, l=12)
    mask = torch.zeros(1, 1, 1, 12, dtype=torch.bool)
    mask[..., :5] = True
    k2, v2 = k.clone(), v.clone()
    k2[..., 5:, :], v2[..., 5:, :] = 1e4, -1e4
    a = qm.quant_attention(q, k, v, mask, 0.25, False, False)
    assert torch.equal(a, qm.quant_attention(q, k2, v2, mask, 0.25, False, False))
    # the cache cut to its 5 attended slots: the same products, summed over 5 terms instead of 12 (7 zeros), which
    # a CPU matmul may order differently (torch 2.13: last bits)
    torch.testing.assert_close(a, qm.quant_attention(q, k[..., :5, :], v[..., :5, :], None, 0.25, False, False),
                               rtol=1e-6, atol=1e-6)
    none = torch.zeros_like(mask)
    assert torch.equal(qm.quant_attention(q, k, v, none, 0.25, False, False), torch.zeros_like(q))


def test_fp8_p_v_keeps_small_probabilities_that_int8_rounds_away():
    """A long row of small probabilities beside one large one: INT8 codes of P (steps of max / 127) zero the small
    ones, FP8 E4M3 codes keep them, so P's error in FP8 ("int8-fp8") is far below all-INT8's (V exact in both)."""
    q, k, v = qkv(b=1, hq=2, hkv=2, s=2, l=512, d=16, seed=6)
    k[:, :, 0] = q[:, :, 0] * 2  # one key that the first query favours (p ~ 0.97), the rest small
    v = v.sign()  # values of -1 / 1: exact in both INT8 (1 -> 127) and FP8 (1 -> 448) codes, so P's codes decide
    want = F.scaled_dot_product_attention(q, k, v, scale=0.25)
    i8 = rel(qm.quant_attention(q, k, v, None, 0.25, False, False, True, False), want)
    mixed = rel(qm.quant_attention(q, k, v, None, 0.25, False, False, True, True), want)
    assert mixed < i8 / 2, (mixed, i8)


def test_quantization_is_what_changes_the_result():
    """Codes: Q.K^T runs on integers (at most 127 in magnitude), so scaling q by a power of two leaves the codes
    as they are; the result moves only with the scale's effect on the softmax."""
    q, k, v = qkv()
    out = qm.quant_attention(q, k, v, None, 0.25, False, False)
    assert torch.equal(qm.quant_attention(q * 2, k, v, None, 0.125, False, False), out)
    assert not torch.equal(out, F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1),
                                                               v.repeat_interleave(2, 1), scale=0.25))


class Attn(nn.Module):
    def __init__(self, d=32, h=4):
        super().__init__()
        torch.manual_seed(0)
        self.h, self.qkv, self.o = h, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(a.transpose(1, 2).reshape(b, s, d))


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_pass_rewrites_sdpa_and_matches_eager_with_the_reference(dtype):
    x = torch.randn(2, 6, 32)
    gm = captured(Attn(), x)
    ctx = PassContext(replace(get_config("none"), attention=AttentionQuant(dtype, "head")), (x,))
    run_until(gm, ctx, "fuse_gemm_epilogue")
    res = quantize_attention(gm, ctx)
    gm.recompile()
    assert res.rewritten == 1 and count(gm, zqops.quant_attention.default) == 1
    assert count(gm, torch.ops.aten.scaled_dot_product_attention.default) == 0
    assert [f.kind for f in ctx.fusions if f.kind == "quant-attention"] == ["quant-attention"]
    m = Attn()

    def quant_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        return qm.quant_attention(q, k, v, attn_mask, q.shape[-1] ** -0.5 if scale is None else scale, is_causal,
                                  dtype == "fp8")

    with torch.no_grad(), mock.patch.object(F, "scaled_dot_product_attention", quant_sdpa):
        want = m(x)
    with torch.no_grad():
        assert torch.allclose(gm(x), want, atol=1e-5, rtol=1e-4)


def test_pass_is_off_without_the_option():
    x = torch.randn(2, 6, 32)
    gm = captured(Attn(), x)
    ctx = PassContext(get_config("w8a8"), (x,))
    run_until(gm, ctx, "quantize_attention")
    assert count(gm, zqops.quant_attention.default) == 0


def test_config_rejects_a_bad_attention_option_in_one_line():
    with pytest.raises(ConfigError, match="AttentionQuant.dtype must be one of 'int8', 'fp8', 'int8-fp8'"):
        AttentionQuant("int4")
    with pytest.raises(ConfigError, match="AttentionQuant.granularity must be one of 'head', 'token'"):
        AttentionQuant("int8", "channel")
    with pytest.raises(ConfigError, match=r"QuantConfig.attention must be an AttentionQuant"):
        QuantConfig(attention="int8")


def _hf_with_quant_attention(model, fp8: bool, per_token: bool = False, pv_fp8: bool = False):
    """The HF model's eager forward with every SDPA call replaced by the reference quantized attention."""
    def quant_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **_):
        return qm.quant_attention(q, k, v, attn_mask, q.shape[-1] ** -0.5 if scale is None else scale, is_causal,
                                  fp8, per_token, pv_fp8)
    return mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", quant_sdpa)


@pytest.mark.parametrize("dtype,granularity", [("int8", "head"), ("int8", "token"), ("int8-fp8", "token")])
def test_engine_and_generation_equal_hf_with_the_same_quantized_attention(dtype, granularity):
    """config "none" + AttentionQuant: the GEMMs stay float, so the engine's logits and its greedy tokens must be
    Hugging Face's own with the reference quantized attention in place of SDPA (prefill, then every decode step
    over the KV cache); and they differ from float attention."""
    model = tiny_model("llama")
    ids = make_ids(1, 10, seed=4)
    cfg = replace(get_config("none"), attention=AttentionQuant(dtype, granularity))
    engine = zq.compile(model, (ids,), config=cfg, generation=CacheSpec(1, 40))
    with torch.no_grad(), _hf_with_quant_attention(model, False, granularity == "token", dtype != "int8"):
        want = model(ids).logits
        hf_tokens = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with torch.no_grad():
        got = engine(ids)
        float_logits = model(ids).logits
    got = got.logits if hasattr(got, "logits") else (got[0] if isinstance(got, (tuple, list)) else got)
    assert rel(got, want) < 1e-4
    assert rel(got, float_logits) > 1e-4  # the attention really ran quantized
    assert torch.equal(engine.generate(ids, max_new_tokens=12), hf_tokens)
    assert "quant-attention" in engine.report()


def test_left_padded_generation_equals_hf_and_each_row_alone():
    """Left padding: the padded slots set no K / V scale, so a padded row generates what it generates alone, and
    the batch equals Hugging Face's generate with the same quantized attention."""
    model = tiny_model("llama")
    ids = make_ids(3, 10, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ids = ids.masked_fill(mask == 0, 0)
    engine = zq.compile(model, (ids,), config=replace(get_config("none"), attention=AttentionQuant()),
                        generation=CacheSpec(3, 40))
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=12)
    with torch.no_grad(), _hf_with_quant_attention(model, False, True, True):
        hf = model.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(out, hf)
    alone = engine.generate(ids[1:2, 4:], max_new_tokens=12)
    assert torch.equal(alone[0, 6:], out[1, 10:])


def test_encoder_w8a8_with_quantized_attention_stays_close_to_fp32():
    model = tiny_model("bert")
    ids = make_ids(2, 12, seed=5)
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    cfg = replace(get_config("w8a8"), attention=AttentionQuant("int8"))
    out = zq.compile(model, (ids,), config=cfg)(ids)
    out = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    assert rel(out, ref) < 0.05


def test_cli_compiles_with_quantized_attention_loads_elsewhere_and_refuses_what_cannot_hold_it(tmp_path):
    """`zqcompile compile --attention int8` in one process; the saved engine loaded in another gives the first
    process's outputs; ONNX export and a compressed-tensors folder refuse it in one line, before writing."""
    from ..subproc import run_cli, run_python
    folder = tmp_path / "llama"
    tiny_model("llama").save_pretrained(folder)
    out = tmp_path / "m.zq"
    r = run_cli("compile", folder, "--config", "w8a8", "--attention", "int8", "--no-generation", "-o", out)
    assert r.returncode == 0, r.stderr
    code = ("import sys, torch, zqcompile as zq\n"
            "e = zq.load(sys.argv[1]); ids = torch.arange(2, 14).view(1, 12)\n"
            "o = e(ids); o = o.logits if hasattr(o, 'logits') else o[0]\n"
            "print(e.record.config_name if hasattr(e.record, 'config_name') else '', "
            "int(sum(f['kind'] == 'quant-attention' for f in e.record.fusions)), float(o.abs().sum()))\n")
    a, b = run_python(code, out), run_python(code, out)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.split()[-2] == "2"  # both layers' attention, the same outputs
    onnx = run_cli("export", out, "--format", "onnx", "-o", tmp_path / "m.onnx")
    assert onnx.returncode != 0 and "quantized attention" in onnx.stderr and not (tmp_path / "m.onnx").exists()
    ct = run_cli("compile", folder, "--attention", "fp8", "--format", "compressed-tensors", "--out", tmp_path / "ct")
    assert ct.returncode != 0 and "--attention has no compressed-tensors form" in ct.stderr
    assert len(ct.stderr.strip().splitlines()) == 1 and not (tmp_path / "ct").exists()


def test_compressed_tensors_export_refuses_an_engine_with_quantized_attention(tmp_path):
    model = tiny_model("llama")
    ids = make_ids(1, 8, seed=2)
    engine = zq.compile(model, (ids,), config=replace(get_config("w8a8"), attention=AttentionQuant()),
                        generation=False)
    with pytest.raises(zq.ExportError, match="quantized attention"):
        zq.export_compressed_tensors(engine, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_additive_masks_with_the_dtypes_lowest_value_count_as_masked():
    """Hugging Face writes masked slots of an additive mask as the dtype's lowest value, not -inf: those slots
    must set no K / V scale, exactly like a boolean mask's."""
    q, k, v = qkv(b=1, s=2, l=10)
    keep = torch.ones(1, 1, 2, 10, dtype=torch.bool)
    keep[..., 7:] = False
    k[..., 7:, :], v[..., 7:, :] = 1e3, -1e3  # padding rows with large values
    lowest = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    for per_token in (False, True):
        want = qm.quant_attention(q, k, v, keep, 0.25, False, False, per_token)
        assert torch.equal(qm.quant_attention(q, k, v, lowest, 0.25, False, False, per_token), want)


class EagerAttn(Attn):
    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) * (d // self.h) ** -0.5, dim=-1) @ v
        return self.o(a.transpose(1, 2).reshape(b, s, d))


def test_a_graph_without_sdpa_says_its_attention_stays_float():
    x = torch.randn(2, 6, 32)
    gm = captured(EagerAttn(), x)
    ctx = PassContext(replace(get_config("w8a8"), attention=AttentionQuant()), (x,))
    run_until(gm, ctx, "fuse_gemm_epilogue")
    with pytest.warns(zq.ConfigWarning, match="no SDPA call .* attention stays float"):
        res = quantize_attention(gm, ctx)
    assert res.rewritten == 0 and any(n.candidate == "quant_attention" for n in ctx.not_fused)
