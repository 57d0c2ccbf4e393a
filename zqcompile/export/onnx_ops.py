"""Standard-dialect ONNX translations of the zq ops, each registered against its op declaration with
`@onnx_translation(name, dialect="standard")`; the exporter (zqcompile/export/onnx.py) builds torch.onnx's
`custom_translation_table` from the registry. Ops declared tensorrt="standard" use these inside TensorRT too.

Each translator restates one op of zqcompile/ops/quant_math.py with standard ONNX ops (opset 18) that ONNX
Runtime's CPU provider runs. The constants (EPS, QMAX) are imported from quant_math, never re-typed.
Numerics, and why they match the reference:
- per-token quant: ReduceMax(Abs) -> Max(EPS) -> 127/amax -> Mul -> Round (half to even, as torch.round)
  -> Clip(+-127) -> Cast int8: the same fp32 operations in the same order, so q and scale are bit-exact.
- INT8 GEMM: MatMulInteger (int8 activations and weights shifted to uint8 with zero point 128, -> int32, exact on
  every CPU: see matmul_integer). Row groups: Cast to
  fp32 then * w_scale[n] * x_scale[m] in fp32 (the shape ORT runs fastest; exact in the cast while |acc| <
  2^24, then two fp32 roundings like the reference's, so results agree to ~1 ulp; measured in the bench, a
  float64 scale product made this 1.5x slower). K-groups: per-group int32 sums scaled and added in float64,
  cast to fp32 once, as the reference does.
- INT4 weights: the packed uint8 initializer is unpacked by Mod/Div in the graph; ORT folds that constant
  subgraph at session load, so the file keeps the 4-bit size and the kernel sees int8.
- FP8 E4M3 (opset 19): QuantizeLinear / DequantizeLinear with float8e4m3fn codes, bit-exact with torch's cast
  (saturating, round half to even); the GEMM dequantizes both operands and multiplies in fp32 (see below).
- LayerNorm / erf / tanh come from ORT's own kernels and may differ from torch by an ulp, which can move a
  quantized value by one step where x * 127 / amax lands on a .5 boundary (tests allow 1 LSB there).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnxscript import opset18 as op
from onnxscript import opset19 as op19

from zqcompile.ops import quant_math as qm
from zqcompile.ops.registry import onnx_translation

FLOAT, DOUBLE, UINT8, INT8, INT32, INT64 = 1, 11, 2, 3, 6, 7


def _f(v: float):
    return op.Constant(value_float=float(v))


def _ints(*v: int):
    return op.Constant(value_ints=list(v))


def empty_like(x):
    """A 0-element tensor of x's dtype: the `emit_out=False` outputs of the fused ops."""
    dtype = ir.DataType(x.dtype).numpy()
    return op.Constant(value=ir.tensor(np.empty((0,), dtype=dtype)))


def dtype_of(x) -> int:
    """ONNX dtype code of a value coming from the fx graph (values made inside a translator carry none)."""
    if x.dtype is None:
        raise ValueError(f"no dtype known for ONNX value {x.name!r}")
    return int(x.dtype)


# ---- activation quantization -----------------------------------------------------------------------------
def _quantize_rows(xf, inv):
    """q = clamp(round_half_even(x * inv), -127, 127) as int8 (quant_math.quantize_rows)."""
    q = op.Clip(op.Round(op.Mul(xf, inv)), _f(-qm.QMAX[8]), _f(qm.QMAX[8]))
    return op.Cast(q, to=INT8)


def token_quant(x):
    """(int8 q, fp32 scale [..., 1]) of quant_math.quantize_per_token."""
    xf = op.Cast(x, to=FLOAT)
    amax = op.Max(op.ReduceMax(op.Abs(xf), _ints(-1), keepdims=1), _f(qm.EPS))
    inv = op.Div(_f(127.0), amax)
    return _quantize_rows(xf, inv), op.Div(amax, _f(127.0))


@onnx_translation("quantize_per_token", dialect="standard")
def quantize_per_token(x):
    return token_quant(x)


@onnx_translation("quantize_per_tensor", dialect="standard")
def quantize_per_tensor(x, scale):
    s = op.Reshape(op.Cast(scale, to=FLOAT), _ints())  # 0-d
    q = _quantize_rows(op.Cast(x, to=FLOAT), op.Div(_f(1.0), s))
    rows = op.Concat(op.Slice(op.Shape(x), _ints(0), _ints(-1)), _ints(1), axis=0)
    return q, op.Expand(s, rows)


@onnx_translation("dequantize_per_token", dialect="standard")
def dequantize_per_token(q, scale, dtype: int):
    return op.Cast(op.Mul(op.Cast(q, to=FLOAT), op.Cast(scale, to=FLOAT)), to=dtype)


# ---- weights -------------------------------------------------------------------------------------------
def unpack_int4(p):
    """uint8 [N, K/2] -> int8 [N, K]: low nibble = even k, high = odd k, two's complement (quant_math)."""
    v = op.Cast(p, to=INT64)
    sixteen, eight = op.Constant(value_int=16), op.Constant(value_int=8)
    lo, hi = op.Mod(v, sixteen), op.Div(v, sixteen)
    # (n + 8) mod 16 - 8 maps 0..15 to 0..7, -8..-1 without a branch
    lo = op.Sub(op.Mod(op.Add(lo, eight), sixteen), eight)
    hi = op.Sub(op.Mod(op.Add(hi, eight), sixteen), eight)
    pairs = op.Concat(op.Unsqueeze(lo, _ints(-1)), op.Unsqueeze(hi, _ints(-1)), axis=-1)
    return op.Cast(op.Reshape(pairs, _ints(0, -1)), to=INT8)


def weight_int8(wq, w_bits: int):
    return unpack_int4(wq) if w_bits == 4 else wq


def _num_groups(w_scale) -> int:
    return _static_dim(w_scale, 1)


def _static_dim(v, i: int) -> int:
    d = v.shape[i] if v.shape is not None else None
    if not isinstance(d, int):
        raise ValueError(f"weights need static shapes, got {v.shape}")
    return d


def dequantize_weight_float(wq, w_scale, w_bits: int):
    """fp32 [N, K] = int weight * its group's scale (quant_math.dequantize_weight)."""
    w = op.Cast(weight_int8(wq, w_bits), to=FLOAT)
    s = op.Cast(w_scale, to=FLOAT)
    if _num_groups(w_scale) == 1:
        return op.Mul(w, s)
    g = _num_groups(w_scale)
    wg = op.Reshape(w, _ints(0, g, -1))  # [N, G, group_k]
    return op.Reshape(op.Mul(wg, op.Unsqueeze(s, _ints(-1))), _ints(0, -1))


@onnx_translation("dequantize_weight", dialect="standard")
def dequantize_weight(wq, w_scale, w_bits: int, dtype: int):
    return op.Cast(dequantize_weight_float(wq, w_scale, w_bits), to=dtype)


# ---- GEMM and epilogue ----------------------------------------------------------------------------------
def apply_act(y, act: str):
    if act == "none":
        return y
    if act == "gelu":
        return op.Mul(op.Mul(y, _f(0.5)), op.Add(_f(1.0), op.Erf(op.Mul(y, _f(0.7071067811865476)))))
    if act == "gelu_tanh":
        inner = op.Mul(_f(0.7978845608028654), op.Add(y, op.Mul(_f(0.044715), op.Mul(y, op.Mul(y, y)))))
        return op.Mul(op.Mul(y, _f(0.5)), op.Add(_f(1.0), op.Tanh(inner)))
    if act == "relu":
        return op.Relu(y)
    if act == "silu":
        return op.Mul(y, op.Sigmoid(y))
    raise ValueError(f"no ONNX translation for activation {act!r}; known: {qm.ACTIVATIONS}")


def epilogue(y, bias, act: str, residual, out_dtype: int):
    """fp32 y -> + bias -> act -> + residual -> out dtype (quant_math.epilogue)."""
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=FLOAT))
    y = apply_act(y, act)
    if residual is not None:
        y = op.Add(y, op.Cast(residual, to=FLOAT))
    return op.Cast(y, to=out_dtype)


def _to_uint8_128(t):
    """int8 -> uint8 + 128 (the same integers with zero point 128)."""
    return op.Cast(op.Add(op.Cast(t, to=INT32), op.Constant(value=ir.tensor(np.array(128, dtype=np.int32)))),
                   to=UINT8)


def matmul_integer(xq, w):
    """Exact int32 xq @ w as MatMulInteger on uint8 operands with zero point 128 each ((q + 128) - 128 = q).
    Both are shifted: ORT's u8 x s8 CPU kernel uses VPMADDUBSW on AVX2 / AVX-512 machines without VNNI, whose
    int16 sums of two products saturate (2 * 255 * 127 > 32767), so u8 x s8 results were wrong there (a tiny GPT-2's
    first GEMM off by up to 24,085 on an AVX2-only CPU; exact on VNNI machines). u8 x u8 widens before it
    multiplies: exact on every CPU. The weight's shift is a constant subgraph ORT folds at session load."""
    zero = op.Constant(value=ir.tensor(np.array(128, dtype=np.uint8)))
    return op.MatMulInteger(_to_uint8_128(xq), _to_uint8_128(w), zero, zero)


def int_gemm_k_groups(xq, wq, w_scale, w_bits: int):
    """fp32 [..., N] = sum over K-groups of (xq @ w_g^T) * w_scale[:, g], integer sums exact, scaled in float64."""
    w = weight_int8(wq, w_bits)
    g = _num_groups(w_scale)
    s = op.Cast(w_scale, to=DOUBLE)
    # one int32 GEMM per K-group as a batched MatMulInteger: [G, M, gk] x [G, gk, N]
    k = _static_dim(wq, 1) * (2 if w_bits == 4 else 1)
    x2 = op.Transpose(op.Reshape(xq, _ints(-1, g, k // g)), perm=[1, 0, 2])
    wg = op.Transpose(op.Reshape(w, _ints(0, g, -1)), perm=[1, 2, 0])
    acc = op.Cast(matmul_integer(x2, wg), to=DOUBLE)                       # [G, M, N]
    acc = op.ReduceSum(op.Mul(acc, op.Unsqueeze(op.Transpose(s, perm=[1, 0]), _ints(1))), _ints(0), keepdims=0)
    out_shape = op.Concat(op.Slice(op.Shape(xq), _ints(0), _ints(-1)), op.Slice(op.Shape(wq), _ints(0), _ints(1)), axis=0)
    return op.Cast(op.Reshape(acc, out_shape), to=FLOAT)


@onnx_translation("int8_gemm_dequant", dialect="standard")
def int8_gemm_dequant(xq, x_scale, wq, w_scale, bias, residual, act: str, w_bits: int, out_dtype: int,
                      two_level: bool = False):  # the same values either way (an fp32 K-group scale each)
    if _num_groups(w_scale) == 1:
        acc = op.Cast(matmul_integer(xq, op.Transpose(weight_int8(wq, w_bits), perm=[1, 0])), to=FLOAT)
        y = op.Mul(op.Mul(acc, op.Reshape(op.Cast(w_scale, to=FLOAT), _ints(-1))), op.Cast(x_scale, to=FLOAT))
        return epilogue(y, bias, act, residual, out_dtype)
    y = op.Mul(int_gemm_k_groups(xq, wq, w_scale, w_bits), op.Cast(x_scale, to=FLOAT))
    return epilogue(y, bias, act, residual, out_dtype)


@onnx_translation("weight_only_gemm", dialect="standard")
def weight_only_gemm(x, wq, w_scale, bias, residual, act: str, w_bits: int):
    w = dequantize_weight_float(wq, w_scale, w_bits)
    y = op.MatMul(op.Cast(x, to=FLOAT), op.Transpose(w, perm=[1, 0]))
    return epilogue(y, bias, act, residual, dtype_of(x))


# ---- producers fused with quantization ------------------------------------------------------------------
def norm(h, weight, bias, eps: float, kind: str, dtype: int):
    if kind == "layer":
        y = op.LayerNormalization(h, weight, bias, axis=-1, epsilon=eps)
        return y[0] if isinstance(y, (tuple, list)) else y
    if kind == "rms":
        # Hugging Face RMSNorm: normalise in fp32, cast back to the input dtype, then scale
        hf = op.Cast(h, to=FLOAT)
        ms = op.ReduceMean(op.Mul(hf, hf), _ints(-1), keepdims=1)
        y = op.Cast(op.Div(hf, op.Sqrt(op.Add(ms, _f(eps)))), to=dtype)
        return op.Mul(weight, y)
    raise ValueError(f"no ONNX translation for norm kind {kind!r}")


@onnx_translation("norm_quant", dialect="standard")
def norm_quant(x, residual, weight, bias, eps: float, kind: str, emit_out: bool, emit_sum: bool):
    h = x if residual is None else op.Add(x, residual)
    y = norm(h, weight, bias, eps, kind, dtype_of(x))
    q, s = token_quant(y)
    out = y if emit_out else empty_like(x)
    hsum = op.Identity(h) if emit_sum and residual is not None else empty_like(x)
    return q, s, out, hsum


def act_producer(x, bias, gate, act: str):
    if bias is not None:
        x = op.Add(x, bias)
    if gate is not None:
        return op.Mul(apply_act(gate, act), x)
    return apply_act(x, act)


@onnx_translation("act_quant", dialect="standard")
def act_quant(x, bias, gate, act: str, emit_out: bool):
    y = act_producer(x, bias, gate, act)
    q, s = token_quant(y)
    return q, s, (y if emit_out else empty_like(x))


# ---- FP8 E4M3 (opset 19: the exporter raises the model's opset to FP8_OPSET when the graph has FP8 tensors) --
# x * (448 / amax) then QuantizeLinear with scale 1 (saturating, round half to even), as quant_math multiplies by
# the reciprocal: a QuantizeLinear with scale amax / 448 would divide and differ from the reference by an ulp.
FP8_OPSET = 19
FLOAT8E4M3FN = 17


def _fp8_zero():
    return op19.Constant(value=ir.tensor(np.zeros((), dtype=ml_dtypes.float8_e4m3fn)))


def fp8_to_float(q, scale=None, axis: int = 1):
    """DequantizeLinear of FP8 codes: scale None = 1 (the codes' values; per-token scales are multiplied after),
    else a 1-D scale along `axis` (the weight's rows)."""
    if scale is None:
        return op19.DequantizeLinear(q, _f(1.0), _fp8_zero())
    # per axis: no zero point (it would have to be 1-D of the axis' length; the codes' type is the input's)
    return op19.DequantizeLinear(q, op.Reshape(op.Cast(scale, to=FLOAT), _ints(-1)), axis=axis)


def token_quant_fp8(x):
    """(FP8 q, fp32 scale [..., 1]) of quant_math.quantize_per_token_fp8."""
    xf = op.Cast(x, to=FLOAT)
    amax = op.Max(op.ReduceMax(op.Abs(xf), _ints(-1), keepdims=1), _f(qm.EPS))
    q = op19.QuantizeLinear(op.Mul(xf, op.Div(_f(qm.FP8_MAX), amax)), _f(1.0), _fp8_zero())
    return q, op.Div(amax, _f(qm.FP8_MAX))


@onnx_translation("quantize_per_token_fp8", dialect="standard")
def quantize_per_token_fp8(x):
    return token_quant_fp8(x)


@onnx_translation("norm_quant_fp8", dialect="standard")
def norm_quant_fp8(x, residual, weight, bias, eps: float, kind: str, emit_out: bool, emit_sum: bool):
    h = x if residual is None else op.Add(x, residual)
    y = norm(h, weight, bias, eps, kind, dtype_of(x))
    q, s = token_quant_fp8(y)
    return q, s, (y if emit_out else empty_like(x)), (op.Identity(h) if emit_sum and residual is not None
                                                       else empty_like(x))


@onnx_translation("act_quant_fp8", dialect="standard")
def act_quant_fp8(x, bias, gate, act: str, emit_out: bool):
    y = act_producer(x, bias, gate, act)
    q, s = token_quant_fp8(y)
    return q, s, (y if emit_out else empty_like(x))


@onnx_translation("fp8_gemm_dequant", dialect="standard")
def fp8_gemm_dequant(xq, x_scale, wq, w_scale, bias, residual, act: str, out_dtype: int):
    """fp32 x values @ (W values * row scale)^T, then * x_scale: ORT has no FP8 MatMul on CPU, so both operands
    are dequantized (exactly, for x) and multiplied in fp32."""
    w = fp8_to_float(wq, w_scale, axis=0)
    y = op.Mul(op.MatMul(fp8_to_float(xq), op.Transpose(w, perm=[1, 0])), op.Cast(x_scale, to=FLOAT))
    return epilogue(y, bias, act, residual, out_dtype)
