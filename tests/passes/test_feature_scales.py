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


def outlier_bert():
    """Tiny post-LN BERT with a few large LayerNorm-weight channels inside (all-MiniLM-L6-v2's LN outputs have
    them); the last LN (the output) has none, or that channel alone would make every embedding alike."""
    m = tiny_bert()
    with torch.no_grad():
        m.embeddings.LayerNorm.weight[3] = 20.0
        m.encoder.layer[0].output.LayerNorm.weight[3] = 20.0
        for layer in m.encoder.layer:
            layer.attention.output.LayerNorm.weight[7] = 15.0
    return m


@pytest.fixture(scope="module")
def bert_inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 5:] = 0  # a short padded sentence
    return ids, mask


def test_post_ln_norm_copies_are_exact_in_float(bert_inputs):
    """A LayerNorm feeding the residual and GEMMs: the GEMMs read a copy with weight and bias / s, the residual the
    norm itself; in float the graph computes what it did (embeddings LN, each layer's attention-output LN, layer
    0's output LN; layer 1's output LN feeds only the FP pooler)."""
    b, a, res, gm, ctx = before_and_after(outlier_bert(), bert_inputs, "w8a8-fws", "feature_scales")
    assert res.rewritten == 4
    assert torch.allclose(a.last_hidden_state, b.last_hidden_state, rtol=1e-4, atol=1e-4)
    copies = [f for f in ctx.fusions if f.kind == "feature-scales:norm-copy"]
    assert len(copies) == 4 and all("the norm itself still feeds" in f.fused_op for f in copies)
    assert any("not scale-equivariant" in n.reason for n in ctx.not_fused)  # GeLU before the output dense


def test_post_ln_norm_copies_cut_the_error_and_can_be_turned_off(bert_inputs):
    m, (ids, mask) = outlier_bert(), bert_inputs
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask).last_hidden_state
    err = {}
    for name, fs in (("w8a8", None), ("w8a8-fws", zq.FeatureScales())):
        e = zq.compile(m, (ids, mask), replace(get_config("w8a8"), name=name, feature_scales=fs),
                       calibration_data=[(ids, mask)])
        err[name] = float(((e(ids, mask).last_hidden_state - ref) * mask[..., None]).norm() / ref.norm())
    assert err["w8a8-fws"] < 0.8 * err["w8a8"], err
    with pytest.raises(zq.ExportError, match="norm_copies=False"):
        zq.export_compressed_tensors(e, "unused_dir_never_written")
    off = replace(get_config("w8a8-fws"), feature_scales=zq.FeatureScales(norm_copies=False))
    _, _, res, _, ctx = before_and_after(m, (ids, mask), off, "feature_scales")
    assert res.rewritten == 0
    assert any("also feeds" in n.reason for n in ctx.not_fused)  # the LayerNorm output is the next residual too


def test_feature_scales_config_is_validated():
    with pytest.raises(zq.ConfigError, match="in \\[0, 1\\]"):
        zq.FeatureScales(alpha=1.5)
    with pytest.raises(zq.ConfigError, match="FeatureScales or None"):
        replace(get_config("w8a8"), feature_scales=0.5)
