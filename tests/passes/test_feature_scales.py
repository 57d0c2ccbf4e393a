"""feature_scales (ZeroQuant-HERO's feature-wise quantization): the folding is exact in float, the scales cut
the quantized error of an outlier-channel model, producers that are not scale-equivariant are skipped with a
reason, and the generation graphs fold the same scales (their quantized weights are the engine's)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import zqcompile as zq
from tests._tiny import tiny_bert, tiny_llama
from zqcompile.config import get_config

from .helpers import before_and_after


def outlier_llama():
    """Tiny Llama with a few large norm-weight channels, as real LMs have (SmolLM2: max|x_j| ~ 30x the median)."""
    m = tiny_llama()
    with torch.no_grad():
        for layer in m.model.layers:
            layer.input_layernorm.weight[3] = 20.0
            layer.post_attention_layernorm.weight[7] = 15.0
            layer.mlp.up_proj.weight[11] *= 12.0
    return m


def test_folding_is_exact_in_float():
    m = outlier_llama()
    x = torch.randint(0, 128, (2, 16))
    b, a, res, gm, ctx = before_and_after(m, (x,), "w8a8-fws", "feature_scales")
    assert res.matched == 6 and res.rewritten == 6  # 2 norms + 1 up -> down per layer
    assert torch.allclose(a.logits, b.logits, rtol=1e-4, atol=1e-4)
    kinds = sorted(f.note.split(",")[0] for f in ctx.fusions if f.kind == "feature-scales")
    assert len(kinds) == 6 and all(k.startswith("alpha 0.") for k in kinds)


def test_scales_cut_the_quantized_error_and_generation_uses_the_same_weights():
    m = outlier_llama()
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = m(x).logits
    err = {}
    for cfg in ("w8a8", "w8a8-fws"):
        e = zq.compile(m, (x,), cfg, generation=zq.CacheSpec(2, 32) if cfg == "w8a8-fws" else False)
        err[cfg] = float((e(x).logits - ref).norm() / ref.norm())
    assert err["w8a8-fws"] < 0.8 * err["w8a8"], err
    text = e.report()
    assert text.count("feature-scales ") >= 6 and "random tokens (no calibration data)" in text
    quantized = {n: t for n, t in e.gm.named_buffers() if n.endswith(("_wq", "_w_scale"))}
    decode = {n: t for n, t in e._generator.decode.named_buffers() if n.endswith(("_wq", "_w_scale"))}
    assert len(decode) == len(quantized) and {id(t) for t in decode.values()} == {id(t) for t in quantized.values()}
    # greedy generation runs on the scaled weights: its first token is the full forward's argmax
    out = e.generate(x[:1], max_new_tokens=1)
    assert int(out[0, -1]) == int(e(x[:1]).logits[0, -1].argmax())


def test_given_alpha_and_calibration_data():
    m = outlier_llama()
    x = torch.randint(0, 128, (2, 16))
    cfg = replace(get_config("w8a8"), name="w8a8-a05", feature_scales=zq.FeatureScales(alpha=0.5))
    e = zq.compile(m, (x,), cfg, calibration_data=[(torch.randint(0, 128, (1, 32)),)], generation=False)
    notes = [f["note"] for f in e.record.fusions if f["kind"] == "feature-scales"]
    assert notes and all(n.startswith("alpha 0.50") and "1 calibration batch(es)" in n for n in notes)


def test_post_ln_bert_and_gelu_are_skipped_with_reasons():
    m = tiny_bert()
    x = torch.randint(0, 128, (2, 16))
    e = zq.compile(m, (x,), "w8a8-fws")
    reasons = [n["reason"] for n in e.record.not_fused if n["candidate"] == "feature scales"]
    assert any("also feeds" in r for r in reasons)  # the LayerNorm output is the next residual too
    assert any("not scale-equivariant" in r for r in reasons)  # GeLU before the output dense


def test_feature_scales_config_is_validated():
    with pytest.raises(zq.ConfigError, match="in \\[0, 1\\]"):
        zq.FeatureScales(alpha=1.5)
    with pytest.raises(zq.ConfigError, match="FeatureScales or None"):
        replace(get_config("w8a8"), feature_scales=0.5)
