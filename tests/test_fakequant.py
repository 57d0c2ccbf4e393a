import pytest
import torch
from transformers.pytorch_utils import Conv1D

from zqcompile.config import get_config
from zqcompile.accuracy.fakequant import (FakeQuantLinear, calibrate_static, fake_quant_modules, fake_quantize,
                                 remove_fake_quant)
from zqcompile.ops import quant_math as qm

from ._tiny import tiny_gpt2, tiny_llama


def test_fake_quant_linear_matches_quant_math():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(3, 5, 64)
    x[0, 0, 3] = 40.0  # an outlier token
    fq = FakeQuantLinear(lin, get_config("w8a8").default, "x")
    xq, xs = qm.quantize_per_token(x)
    wq, ws = qm.quantize_weight(lin.weight, 8)
    expect = qm.int8_gemm_dequant(xq, xs, wq, ws, lin.bias, None, "none", 8, torch.float32)
    with torch.no_grad():
        assert torch.allclose(fq(x), expect, atol=1e-4)


def test_conv1d_weight_is_transposed_and_ste_gradient_flows():
    torch.manual_seed(0)
    conv = Conv1D(16, 64)  # nx=64 in, nf=16 out; weight [64, 16]
    fq = FakeQuantLinear(conv, get_config("w4/8a8").roles["fc1"], "c_fc")
    x = torch.randn(2, 64)
    # the preset's default K group (128) does not fit K=64: the weight gets groups of 64
    w = qm.dequantize_weight(*qm.quantize_weight(conv.weight.t(), 4, "k_groups", group_size=64), 4, torch.float32)
    expect = qm.dequantize_rows(*qm.quantize_per_token(x), torch.float32) @ w.t() + conv.bias
    y = fq(x)
    assert torch.allclose(y, expect, atol=1e-5)
    y.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_fake_quantize_follows_the_plan_and_is_reversible():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
    fake_quantize(model, "w8a8")
    mods = fake_quant_modules(model)
    assert len(mods) == 2 * 7  # q k v o gate up down per layer; lm_head (role head) stays FP
    assert not isinstance(model.lm_head, FakeQuantLinear)
    with torch.no_grad():
        out = model(ids).logits
    assert not torch.equal(out, ref) and torch.allclose(out, ref, atol=0.05)
    remove_fake_quant(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_static_activations_need_calibration():
    model = fake_quantize(tiny_gpt2(), "ptq-static")
    ids = torch.randint(0, 128, (1, 8))
    with pytest.raises(RuntimeError, match="calibrate"):
        model(ids)
    assert calibrate_static(model, [ids]) == 8
    m = model.transformer.h[0].mlp.c_fc
    assert float(m.act_scale) == pytest.approx(qm.calibrated_scale(float(m.act_amax)))
    assert torch.isfinite(model(ids).logits).all()


def test_bad_group_size_names_the_module():
    from dataclasses import replace
    from zqcompile.config import ActQuant, GemmScheme, WeightQuant
    cfg = get_config("w8a8")
    cfg = replace(cfg, default=GemmScheme(WeightQuant(4, "k_groups", group_size=48), ActQuant("token")))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*override"):
        fake_quantize(tiny_llama(), cfg)


@pytest.mark.parametrize("weight", [("k_groups", 4, None, 16), ("row_groups", 4, None, None),
                                    ("row_groups", 8, 4, None), ("tensor", 8, None, None)],
    ids=["int4-kgroups", "int4-rows", "int8-row-groups", "int8-tensor"])
def test_learned_clipping_bakes_into_the_engines_max_scales(weight):
    """The student with clipping factors c computes qdq on scales c * max|w_group| / qmax; after baking (the
    weight clamped to +-c * max|w_group|) the engine's own max-based qdq of the weight is the same values."""
    from zqcompile.config import ActQuant, GemmScheme, WeightQuant
    granularity, bits, groups, size = weight
    scheme = GemmScheme(WeightQuant(bits, granularity, num_groups=groups, group_size=size), ActQuant("token"))
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    fq = FakeQuantLinear(lin, scheme, "x")
    untuned = fq._weight().detach().clone()
    clip = fq.learn_clipping()
    assert torch.equal(fq._weight().detach(), untuned)  # factors start at 1: the engine's scales
    with torch.no_grad():
        clip.uniform_(0.6, 1.0)
    student = fq._weight()
    student.sum().backward()
    assert clip.grad is not None and clip.grad.abs().sum() > 0 and lin.weight.grad.abs().sum() > 0
    assert not torch.allclose(student, untuned)
    fq.bake_clipping()
    wq = scheme.weight
    engine = qm.qdq_weight(lin.weight, bits, granularity, wq.num_groups, wq.group_size, False, torch.float32)
    torch.testing.assert_close(engine, student.detach(), rtol=0, atol=1e-6)
