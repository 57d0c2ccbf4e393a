"""Each fused zq op equals the unfused composition of eager torch ops + the quant formulas, and its fake
implementation agrees on shapes/dtypes."""
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import zqcompile.ops  # noqa: F401 - registers the ops
from zqcompile.ops import quant_math as qm

zq = torch.ops.zq


def test_norm_quant_layer_with_residual(rng):
    x, r = torch.randn(2, 5, 48, generator=rng), torch.randn(2, 5, 48, generator=rng)
    w, b = torch.rand(48, generator=rng) + 0.5, torch.randn(48, generator=rng)
    q, s, out, hsum = zq.norm_quant(x, r, w, b, 1e-5, "layer", True, True)
    y = F.layer_norm(x + r, (48,), w, b, 1e-5)
    assert torch.allclose(out, y) and torch.allclose(hsum, x + r)
    q2, s2 = qm.quantize_per_token(y)
    assert torch.equal(q, q2) and torch.equal(s, s2)
    q3, s3, out3, hsum3 = zq.norm_quant(x, None, w, b, 1e-5, "layer", False, False)
    assert out3.numel() == 0 and hsum3.numel() == 0


def test_norm_quant_rms_matches_hf_llama_rmsnorm(rng):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    m = LlamaRMSNorm(32, eps=1e-6)
    m.weight.data = torch.rand(32, generator=rng) + 0.5
    x = torch.randn(3, 4, 32, generator=rng)
    _, _, out, _ = zq.norm_quant(x, None, m.weight, None, 1e-6, "rms", True, False)
    assert torch.allclose(out, m(x), atol=1e-6)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu", "silu"])
def test_act_quant(rng, act):
    x, b = torch.randn(6, 40, generator=rng), torch.randn(40, generator=rng)
    q, s, out = zq.act_quant(x, b, None, act, True)
    y = qm.apply_act(x + b, act)
    assert torch.allclose(out, y)
    assert torch.equal(q, qm.quantize_per_token(y)[0])


def test_act_quant_silu_gate(rng):
    up, gate = torch.randn(6, 40, generator=rng), torch.randn(6, 40, generator=rng)
    q, s, _ = zq.act_quant(up, None, gate, "silu", False)
    assert torch.equal(q, qm.quantize_per_token(F.silu(gate) * up)[0])


@pytest.mark.parametrize("bits,gran,gs", [(8, "row_groups", None), (4, "k_groups", 32)])
def test_int8_gemm_dequant_vs_float_of_quantized_operands(rng, bits, gran, gs):
    x = torch.randn(2, 9, 64, generator=rng)
    x[0, 3] *= 30
    w, b, res = torch.randn(24, 64, generator=rng), torch.randn(24, generator=rng), torch.randn(2, 9, 24, generator=rng)
    xq, xs = zq.quantize_per_token(x)
    wq, ws = qm.quantize_weight(w, bits, gran, group_size=gs)
    y = zq.int8_gemm_dequant(xq, xs, wq, ws, b, res, "gelu", bits, torch.float32)
    want = F.gelu((xq.double() * xs.double()) @ qm.dequantize_weight(wq, ws, bits, torch.float64).t() + b.double()) + res.double()
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5)
    # and close to the float GEMM: the quantization error is what W8A8 costs
    full = F.gelu(x @ w.t() + b) + res
    assert (y - full).norm() / full.norm() < (0.02 if bits == 8 else 0.15)


def test_weight_only_gemm(rng):
    x, w = torch.randn(3, 64, generator=rng), torch.randn(16, 64, generator=rng)
    wq, ws = qm.quantize_weight(w, 8)
    y = zq.weight_only_gemm(x, wq, ws, None, None, "none", 8)
    assert torch.allclose(y, x @ qm.dequantize_weight(wq, ws, 8, torch.float32).t(), atol=1e-5)


def test_fake_impls_agree_with_real_shapes():
    x = torch.randn(2, 3, 64)
    wq, ws = qm.quantize_weight(torch.randn(16, 64), 4, "k_groups", group_size=32)
    real = zq.int8_gemm_dequant(*zq.quantize_per_token(x), wq, ws, None, None, "none", 4, torch.float16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = zq.int8_gemm_dequant(*zq.quantize_per_token(x), wq, ws, None, None, "none", 4, torch.float16)
        nq = zq.norm_quant(x, x, torch.ones(64), None, 1e-5, "rms", False, True)
    assert fake.shape == real.shape and fake.dtype == real.dtype == torch.float16
    assert [t.shape for t in nq] == [x.shape, (2, 3, 1), (0,), x.shape]
