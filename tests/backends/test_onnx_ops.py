"""Each zq op's standard-dialect ONNX translation vs the reference op, run in ONNX Runtime CPU on random data
with outlier tokens. Exported once with a dynamic batch/seq and run at a different shape.

Bounds: ops whose ONNX form repeats the reference's fp32 arithmetic are asserted bit-exact (per-token quant,
the INT8 GEMM without activation, weight dequant). Where ORT's own kernel replaces torch's (LayerNorm, erf,
matmul summation order) outputs differ by a few ulp, so a quantized value may move by one step when it lies on
a rounding boundary: asserted |dq| <= 1 on at most 1% of elements.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from zqcompile.ops import OPS
from zqcompile.ops import quant_math as qm
from zqcompile.export.onnx import translation_table

from onnx_helpers import export_module, outlier_tokens, run_ort

zq = torch.ops.zq
K, N = 64, 48


def _inputs(seed: int, shape=(2, 7)) -> torch.Tensor:
    return outlier_tokens(*shape, K, seed=seed)


def _check(module: torch.nn.Module, make_inputs, tmp_path, exact: tuple[bool, ...], float_rtol: float = 2e-6):
    """Export at one shape, run at another (dynamic axes), compare every output with the reference op."""
    path = export_module(module, make_inputs(0, (2, 7)), tmp_path / "op.onnx")
    inputs = make_inputs(1, (3, 5))
    got = run_ort(path, inputs)
    ref = [r.numpy() for r in module(*inputs)]
    assert len(got) == len(ref)
    for g, r, ex in zip(got, ref, exact):
        assert g.shape == r.shape and g.dtype == r.dtype, (g.shape, r.shape, g.dtype, r.dtype)
        if ex or r.size == 0:
            np.testing.assert_array_equal(g, r)
        elif r.dtype == np.int8:
            diff = np.abs(g.astype(np.int32) - r.astype(np.int32))
            assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, (diff.max(), (diff > 0).mean())
        else:
            scale = max(np.abs(r).max(), 1e-6)
            assert np.abs(g - r).max() <= float_rtol * scale, (np.abs(g - r).max(), scale)
    return got, ref


def test_every_exported_op_has_a_translation():
    assert set(translation_table("standard")) == set(OPS.values())


class QuantPerToken(torch.nn.Module):
    def forward(self, x):
        return zq.quantize_per_token(x)


def test_quantize_per_token_bit_exact(tmp_path):
    got, _ = _check(QuantPerToken(), lambda s, sh: (_inputs(s, sh),), tmp_path, exact=(True, True))
    assert np.all(got[0][0, 1] == 0)  # the all-zero token: EPS keeps the scale finite
    assert np.abs(got[0]).max() == 127


class QuantPerTensor(torch.nn.Module):
    def forward(self, x):
        return zq.quantize_per_tensor(x, torch.tensor(0.05))


def test_quantize_per_tensor_bit_exact(tmp_path):
    _check(QuantPerTensor(), lambda s, sh: (_inputs(s, sh),), tmp_path, exact=(True, True))


class Dequant(torch.nn.Module):
    def forward(self, x):
        q, s = zq.quantize_per_token(x)
        return (zq.dequantize_per_token(q, s, torch.float32),)


def test_dequantize_per_token_bit_exact(tmp_path):
    _check(Dequant(), lambda s, sh: (_inputs(s, sh),), tmp_path, exact=(True,))


class WeightModule(torch.nn.Module):
    def __init__(self, bits: int, granularity: str, group_size: int | None, bias: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        w = torch.randn(N, K, generator=g)
        w[5] *= 30.0  # an outlier output row
        wq, ws = qm.quantize_weight(w, bits, granularity, group_size=group_size)
        self.bits = bits
        self.register_buffer("wq", wq)
        self.register_buffer("ws", ws)
        self.register_buffer("bias", torch.randn(N, generator=g) if bias else None)


class DequantWeight(WeightModule):
    def forward(self, x):
        return (zq.dequantize_weight(self.wq, self.ws, self.bits, torch.float32) + x.sum(),)


WEIGHT_SCHEMES = [(8, "row_groups", None), (8, "k_groups", 16), (4, "row_groups", None), (4, "k_groups", 32)]


@pytest.mark.parametrize("bits,gran,gs", WEIGHT_SCHEMES)
def test_dequantize_weight(tmp_path, bits, gran, gs):
    _check(DequantWeight(bits, gran, gs), lambda s, sh: (torch.zeros(*sh),), tmp_path, exact=(True,))


class Gemm(WeightModule):
    def __init__(self, bits, gran, gs, act="none", residual=False, bias=True):
        super().__init__(bits, gran, gs, bias)
        self.act, self.residual = act, residual

    def forward(self, xq, x_scale, res):
        y = zq.int8_gemm_dequant(xq, x_scale, self.wq, self.ws, self.bias, res if self.residual else None,
                                 self.act, self.bits, torch.float32)
        return (y,)


def _quantized_inputs(seed, shape):
    q, s = qm.quantize_per_token(_inputs(seed, shape))
    return q, s, torch.randn(*shape, N, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits,gran,gs", WEIGHT_SCHEMES)
def test_int8_gemm_dequant_exact(tmp_path, bits, gran, gs):
    """Integer sums are exact; the scale products are fp32 (row groups) or float64 (K-groups) roundings that
    the reference groups differently: within a few ulp of the largest output."""
    _check(Gemm(bits, gran, gs), _quantized_inputs, tmp_path, exact=(False,), float_rtol=3e-7)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu", "silu"])
def test_int8_gemm_dequant_epilogue(tmp_path, act):
    _check(Gemm(8, "row_groups", None, act=act, residual=True), _quantized_inputs, tmp_path, exact=(False,))


def test_int8_gemm_extreme_values_do_not_saturate(tmp_path):
    """All +-127 operands: MLAS kernels that widen u8*s8 pairs into int16 would saturate here."""
    m = Gemm(8, "row_groups", None, bias=False)
    m.wq.fill_(-127)
    m.wq[::2] = 127
    def extreme(seed, shape):
        return torch.full((*shape, K), 127, dtype=torch.int8), torch.ones(*shape, 1), torch.zeros(*shape, N)
    got, _ = _check(m, extreme, tmp_path, exact=(True,))
    assert np.abs(got[0]).max() == pytest.approx(127 * 127 * K * m.ws.max().item(), rel=1e-6)


class WeightOnly(WeightModule):
    def forward(self, x):
        return (zq.weight_only_gemm(x, self.wq, self.ws, self.bias, None, "gelu", self.bits),)


@pytest.mark.parametrize("bits,gran,gs", WEIGHT_SCHEMES[1:3])
def test_weight_only_gemm(tmp_path, bits, gran, gs):
    _check(WeightOnly(bits, gran, gs), lambda s, sh: (_inputs(s, sh),), tmp_path, exact=(False,), float_rtol=5e-6)


class NormQuant(torch.nn.Module):
    def __init__(self, kind: str, residual: bool, emit_out: bool, emit_sum: bool):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.register_buffer("w", 1.0 + 0.1 * torch.randn(K, generator=g))
        self.register_buffer("b", 0.1 * torch.randn(K, generator=g) if kind == "layer" else None)
        self.kind, self.residual, self.emit_out, self.emit_sum = kind, residual, emit_out, emit_sum

    def forward(self, x, r):
        return zq.norm_quant(x, r if self.residual else None, self.w, self.b, 1e-5, self.kind, self.emit_out,
                             self.emit_sum)


@pytest.mark.parametrize("kind,residual,emit_out,emit_sum", [("layer", True, True, True), ("layer", False, False, False),
                                                            ("rms", True, False, True), ("rms", False, True, False)])
def test_norm_quant(tmp_path, kind, residual, emit_out, emit_sum):
    m = NormQuant(kind, residual, emit_out, emit_sum)
    got, ref = _check(m, lambda s, sh: (_inputs(s, sh), _inputs(s + 10, sh)), tmp_path,
                      exact=(False, False, False, True), float_rtol=2e-6)
    assert got[2].size == (ref[2].size)  # empty when not emitted
    assert got[3].size == (ref[3].size)


class ActQuant(torch.nn.Module):
    def __init__(self, act: str, bias: bool, gate: bool, emit_out: bool):
        super().__init__()
        self.register_buffer("b", torch.randn(K) if bias else None)
        self.act, self.gate, self.emit_out = act, gate, emit_out

    def forward(self, x, g):
        return zq.act_quant(x, self.b, g if self.gate else None, self.act, self.emit_out)


@pytest.mark.parametrize("act,bias,gate,emit_out", [("gelu", True, False, False), ("gelu_tanh", True, False, True),
                                                     ("relu", False, False, False), ("silu", False, True, True)])
def test_act_quant(tmp_path, act, bias, gate, emit_out):
    _check(ActQuant(act, bias, gate, emit_out), lambda s, sh: (_inputs(s, sh), _inputs(s + 5, sh)), tmp_path,
           exact=(False, False, False), float_rtol=2e-6)
