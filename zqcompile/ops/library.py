"""The zq op declarations: one `@declare` per quantized operation (zqcompile/ops/registry.py), whose function is
the reference implementation (plain torch, runs on any device; the spec every backend is tested against),
followed by its fake implementation (shapes and dtypes only, for torch.export and fake-tensor checks).

The declaration also gives the op's dump category, whether ONNX / TensorRT export it (and whether TensorRT runs
it as a plugin or as standard ONNX ops) or only the engine's runtime runs it, and whether a CUDA kernel is
expected. Backends register against these declarations (zqcompile/plugins/cuda.py, zqcompile/export/).
Outputs a node does not need are returned as 0-element tensors (flags `emit_out`, `emit_sum`) so one schema
serves every variant of a fused op.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from zqcompile.ops import quant_math as qm
from zqcompile.ops.registry import declare


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


# ---- activation quantization ---------------------------------------------------------------------------
@declare("quant", cuda="kernel", tensorrt="plugin")
def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., K] float -> (int8 [..., K], fp32 scale [..., 1]); dynamic, one scale per token."""
    return qm.quantize_per_token(x)


@quantize_per_token.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@declare("quant", cuda="kernel", tensorrt="standard")
def quantize_per_token_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., K] float -> (float8_e4m3fn [..., K], fp32 scale [..., 1] = max|row| / 448); dynamic per token."""
    return qm.quantize_per_token_fp8(x)


@quantize_per_token_fp8.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=qm.FP8_DTYPE), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@declare("quant", cuda="kernel", tensorrt="standard")
def quantize_per_tensor(x: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Static INT8 with a calibrated 0-d scale; the per-row scale output keeps the GEMM op uniform."""
    return qm.quantize_per_tensor(x, scale)


@quantize_per_tensor.register_fake
def _(x, scale):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@declare("qdq", cuda="reference", tensorrt="standard")
def dequantize_per_token(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Unfused QDQ form (between the insert and fuse passes): int8 (or FP8) rows * scale -> float."""
    return qm.dequantize_rows(q, scale, dtype)


@dequantize_per_token.register_fake
def _(q, scale, dtype):
    return q.new_empty(q.shape, dtype=dtype)


@declare("qdq", cuda="reference", tensorrt="standard")
def dequantize_weight(wq: Tensor, w_scale: Tensor, w_bits: int, dtype: torch.dtype) -> Tensor:
    """Unfused QDQ form of a quantized weight: int8 or FP8 [N, K] (or packed INT4 [N, K/2]) -> float [N, K]."""
    return qm.dequantize_weight(wq, w_scale, w_bits, dtype)


@dequantize_weight.register_fake
def _(wq, w_scale, w_bits, dtype):
    k = wq.shape[1] * (2 if w_bits == 4 else 1)
    return wq.new_empty((wq.shape[0], k), dtype=dtype)


# ---- producers fused with quantization -----------------------------------------------------------------
@declare("fused", cuda="kernel", tensorrt="plugin")
def norm_quant(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float,
               kind: str, emit_out: bool, emit_sum: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """h = x (+ residual); y = LayerNorm/RMSNorm(h) -> (int8 y, per-token scales, y if emit_out,
    h if emit_sum). kind: "layer" | "rms". One pass over the row in a kernel."""
    return _norm_then(qm.quantize_per_token, x, residual, weight, bias, eps, kind, emit_out, emit_sum)


def _norm_then(quantize, x, residual, weight, bias, eps, kind, emit_out, emit_sum):
    h = x if residual is None else x + residual
    y = qm.norm(h, weight, bias, eps, kind)
    q, s = quantize(y)
    return q, s, (y if emit_out else _empty(x)), (h.clone() if emit_sum and residual is not None else _empty(x))


@norm_quant.register_fake
def _norm_quant_fake(x, residual, weight, bias, eps, kind, emit_out, emit_sum):
    out = x.new_empty(x.shape) if emit_out else x.new_empty((0,))
    hsum = x.new_empty(x.shape) if emit_sum and residual is not None else x.new_empty((0,))
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32),
            out, hsum)


@declare("fused", cuda="kernel", tensorrt="standard")
def norm_quant_fp8(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float,
                   kind: str, emit_out: bool, emit_sum: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """norm_quant with FP8 E4M3 codes (quantize_per_token_fp8) instead of int8; one pass over the row in a
    kernel (zq_norm_quant_fp8)."""
    return _norm_then(qm.quantize_per_token_fp8, x, residual, weight, bias, eps, kind, emit_out, emit_sum)


@norm_quant_fp8.register_fake
def _(x, residual, weight, bias, eps, kind, emit_out, emit_sum):
    q, s, out, hsum = _norm_quant_fake(x, residual, weight, bias, eps, kind, emit_out, emit_sum)
    return q.to(qm.FP8_DTYPE), s, out, hsum


@declare("fused", cuda="kernel", tensorrt="plugin")
def act_quant(x: Tensor, bias: Optional[Tensor], gate: Optional[Tensor], act: str,
              emit_out: bool) -> tuple[Tensor, Tensor, Tensor]:
    """y = act(x + bias), or act(gate) * x -> (int8 y, per-token scales, y if emit_out)."""
    return _act_then(qm.quantize_per_token, x, bias, gate, act, emit_out)


def _act_then(quantize, x, bias, gate, act, emit_out):
    y = qm.act_producer(x, bias, gate, act)
    q, s = quantize(y)
    if y is x:  # act "none" without bias or gate: an op's output must not be its input (torch.library's contract)
        y = x.clone()
    return q, s, (y if emit_out else _empty(x))


@act_quant.register_fake
def _act_quant_fake(x, bias, gate, act, emit_out):
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32),
            x.new_empty(x.shape) if emit_out else x.new_empty((0,)))


@declare("fused", cuda="kernel", tensorrt="standard")
def act_quant_fp8(x: Tensor, bias: Optional[Tensor], gate: Optional[Tensor], act: str,
                  emit_out: bool) -> tuple[Tensor, Tensor, Tensor]:
    """act_quant with FP8 E4M3 codes (zq_act_quant_fp8)."""
    return _act_then(qm.quantize_per_token_fp8, x, bias, gate, act, emit_out)


@act_quant_fp8.register_fake
def _(x, bias, gate, act, emit_out):
    q, s, out = _act_quant_fake(x, bias, gate, act, emit_out)
    return q.to(qm.FP8_DTYPE), s, out


# ---- GEMMs with the dequantization fused ---------------------------------------------------------------
@declare("fused", cuda="kernel", tensorrt="plugin")
def int8_gemm_dequant(xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                      residual: Optional[Tensor], act: str, w_bits: int, out_dtype: torch.dtype,
                      two_level: bool = False) -> Tensor:
    """int8 x [..., K] (per-token scales [..., 1]) times INT8/INT4 W [N, K] (scales [N, K/group_k]) ->
    (acc * x_scale * w_scale) (+ bias) -> act -> (+ residual), written once in out_dtype.

    two_level: the compile's promise that the INT4 K-group scales are two-level (qm.two_level_scales: u x a row
    base, u in 1..15), so a kernel may run the GEMM as INT8 x (code x u) with the base as a row scale; the value
    computed is the same (the reference ignores the flag)."""
    return qm.int8_gemm_dequant(xq, x_scale, wq, w_scale, bias, residual, act, w_bits, out_dtype)


@int8_gemm_dequant.register_fake
def _(xq, x_scale, wq, w_scale, bias, residual, act, w_bits, out_dtype, two_level=False):
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=out_dtype)


@declare("fused", cuda="kernel", tensorrt="standard")
def fp8_gemm_dequant(xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                     residual: Optional[Tensor], act: str, out_dtype: torch.dtype) -> Tensor:
    """FP8 E4M3 x [..., K] (per-token scales [..., 1]) times FP8 E4M3 W [N, K] (row scales [N, 1]) ->
    (acc * x_scale * w_scale) (+ bias) -> act -> (+ residual) in out_dtype. CUDA: torch._scaled_mm with
    row-wise scales, or the Hopper FP8 kernel with the epilogue fused (plugins/cuda_gemm.py)."""
    return qm.fp8_gemm_dequant(xq, x_scale, wq, w_scale, bias, residual, act, out_dtype)


@fp8_gemm_dequant.register_fake
def _(xq, x_scale, wq, w_scale, bias, residual, act, out_dtype):
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=out_dtype)


@declare("fused", cuda="kernel", tensorrt="plugin")
def weight_only_gemm(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                     act: str, w_bits: int) -> Tensor:
    """Float x times INT8/INT4 W (A16: weights dequantized in the mainloop) -> epilogue as above."""
    return qm.weight_only_gemm(x, wq, w_scale, bias, residual, act, w_bits)


@weight_only_gemm.register_fake
def _(x, wq, w_scale, bias, residual, act, w_bits):
    return x.new_empty((*x.shape[:-1], wq.shape[0]))


# ---- attention around a KV cache (generation graphs) ----------------------------------------------------
@declare("attention", cuda="kernel", runtime_only=True)
def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding of the query and key heads in one op: q [B, Hq, S, D], k [B, Hkv, S, D] (any strides),
    cos / sin [B, 1, S, D] in their dtype -> contiguous (q', k')."""
    return qm.rope(q, cos, sin).contiguous(), qm.rope(k, cos, sin).contiguous()


@rope.register_fake
def _(q, k, cos, sin):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@declare("attention", cuda="kernel", runtime_only=True, mutates=("k_cache", "v_cache"))
def rope_kv_write(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                  slots: Tensor) -> Tensor:
    """zq.rope of q and k with the generation step's KV-cache write in the same op: the rotated k and the value
    rows v [B, Hkv, S, D] written at positions `slots` (S int64) of dim 2 of k_cache / v_cache [B, Hkv, L, D],
    as index_copy_ writes them -> the rotated q, contiguous."""
    q_rot, k_rot = qm.rope(q, cos, sin).contiguous(), qm.rope(k, cos, sin)
    k_cache.index_copy_(2, slots, k_rot.to(k_cache.dtype))
    v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
    return q_rot


@rope_kv_write.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, slots):
    return q.new_empty(q.shape)


@declare("attention", cuda="kernel", runtime_only=True)
def gqa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Attention of q [B, Hq, S, D] over the KV cache k / v [B, Hkv, L, D] with boolean mask [B, 1, S, L],
    the KV heads shared by Hq / Hkv query heads without materialising the repeat -> [B, Hq, S, D]."""
    return qm.gqa_attention(q, k, v, mask, scale)


@gqa_attention.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty(q.shape)


@declare("attention", cuda="reference", runtime_only=True,
         not_exported="HERO's quantized attention (QuantConfig.attention) runs on the engine's runtime only and "
                      "has no ONNX lowering; compile without `attention` to export")
def quant_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, is_causal: bool,
                    fp8: bool, per_token: bool, pv_fp8: bool) -> Tensor:
    """ZeroQuant-HERO's quantized attention (QuantConfig.attention): Q.K^T on INT8 (fp8: FP8 E4M3) codes and P.V
    on INT8 (pv_fp8: FP8) codes, with dynamic scales per head (per_token: Q / K per token, V per channel; P per
    query row); q [B, Hq, S, D], k / v [B, Hkv, L, D], mask None / boolean / additive -> [B, Hq, S, D]
    (ops/quant_math.quant_attention). No CUDA kernel yet: the reference runs."""
    return qm.quant_attention(q, k, v, mask, scale, is_causal, fp8, per_token, pv_fp8)


@quant_attention.register_fake
def _(q, k, v, mask, scale, is_causal, fp8, per_token, pv_fp8):
    return q.new_empty(q.shape)


# ---- tensor parallelism (zqcompile/parallel) -------------------------------------------------------------
@declare("collective", cuda="reference", runtime_only=True)
def all_reduce(x: Tensor, group: str) -> Tensor:
    """The sum of x over the ranks of the process group named `group` (torch.distributed's group_name), as a new
    tensor: the partial outputs of a row-parallel GEMM (o_proj, down_proj) become the full output on every
    rank. torch.distributed runs it (NCCL on CUDA, gloo on CPU: that is its CUDA implementation, no zq kernel);
    a peer that exited or did not answer within the group's timeout raises TensorParallelError."""
    import torch.distributed as dist
    from zqcompile.errors import TensorParallelError
    c10d = torch.ops._c10d_functional
    try:
        return c10d.wait_tensor(c10d.all_reduce(x.contiguous(), "sum", group))
    except RuntimeError as e:  # gloo / NCCL: a closed connection, a timeout, an aborted communicator
        rank = f"rank {dist.get_rank()} of {dist.get_world_size()}" if dist.is_initialized() else "this rank"
        reason = " ".join(str(e).split())[:300]
        raise TensorParallelError(f"tensor parallel: {rank}: an all-reduce failed: another rank exited or did not "
                                  f"answer within the process group's timeout ({reason})") from None


@all_reduce.register_fake
def _(x, group):
    return x.new_empty(x.shape)
