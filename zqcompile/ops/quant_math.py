"""The quantization formulas, written once. Every reference op, pass, exporter and test imports these.

Conventions (the contract the CUDA kernels and the ONNX/TensorRT translations implement):
- Symmetric INT8 activations, per token (row of the last dim): amax = max|x_row| in fp32,
  amax_c = max(amax, EPS), scale = amax_c / 127, q = clamp(round_half_even(x * (127 / amax_c)), -127, 127).
  Multiplying by the reciprocal (not dividing) is what the kernels do, so the reference does it too.
- Static per-tensor INT8: the same with one calibrated scale: q = clamp(round(x * (1 / scale)), -127, 127).
- Weights W [N, K] (out, in): symmetric, qmax = 127 (INT8) or 7 (INT4); scales of shape [N, K // group_k]
  in fp32 (row groups and per-tensor: group_k = K, the scale expanded to each row, the layout the GEMM
  epilogue reads per output column). INT4 packs two values per byte along K: element 2j in the low
  nibble, 2j+1 in the high nibble, two's complement.
- FP8 E4M3 (torch.float8_e4m3fn, largest finite 448): per-token activations scale = amax_c / 448,
  q = fp8(clamp(x * (448 / amax_c), -448, 448)) (round to nearest even in the cast); weights one scale per
  output row, max|w_row| / 448, q = fp8(clamp(w / scale, -448, 448)). The clamp matters: E4M3FN has no
  infinity, an out-of-range cast gives NaN.
- GEMM: acc = sum_k xq * wq computed exactly (int32 in kernels; float64 here, exact for these ranges),
  with K-group scales applied per group; y = acc * x_scale[m] (* w_scale[n, g]) (+ bias) -> act -> (+ residual).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8  # an all-zero token quantizes to zeros with a tiny (not zero) scale
QMAX = {8: 127, 4: 7}
ACTIVATIONS = ("none", "gelu", "gelu_tanh", "relu", "silu")


FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def token_scale(x: torch.Tensor, qmax: float = 127.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last dim) amax -> (scale [..., 1], inverse multiplier [..., 1]), both fp32."""
    amax = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(EPS)
    return amax / qmax, qmax / amax


def quantize_rows(x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x.float() * inv_scale).clamp_(-127, 127).to(torch.int8)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale, inv = token_scale(x)
    return quantize_rows(x, inv), scale


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """fp32 values already divided by their scale -> float8_e4m3fn, saturated at +-448."""
    return x.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (float8_e4m3fn [..., K], fp32 scale [..., 1] = max|row| / 448)."""
    scale, inv = token_scale(x, FP8_MAX)
    return to_fp8(x.float() * inv), scale


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype == FP8_DTYPE


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Static: one calibrated scale (0-d fp32). Returns per-row scales too so the GEMM op is uniform."""
    s = scale.float().reshape(())
    q = quantize_rows(x, 1.0 / s)
    return q, s.expand(*x.shape[:-1], 1).clone()


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def calibrated_scale(amax: float) -> float:
    return max(float(amax), EPS) / 127.0


# ---- weights ------------------------------------------------------------------------------------------
DEFAULT_K_GROUP = 128  # INT4 K-group size when none is given (the paper's and GPTQ-style kernels' choice)


def weight_group_k(shape: tuple[int, int], granularity: str, group_size: int | None) -> int:
    """Elements along K that share one scale (K for row groups and per-tensor). Does not check that the
    size fits: check_weight_groups does."""
    _, k = shape
    if granularity == "k_groups":
        if group_size is not None:
            return group_size
        # default: 128 along K, or the largest power of two under it that divides K (SmolLM2's K = 576 -> 64)
        g = DEFAULT_K_GROUP
        while g > 1 and k % g:
            g //= 2
        return g
    return k


def check_weight_groups(shape: tuple[int, int], bits: int, granularity: str, num_groups: int | None = None,
                        group_size: int | None = None) -> int:
    """The K-group size a [N, K] weight gets under this scheme; ValueError (the reason, no module name) when
    the groups do not fit the weight. Never clamps: a scheme is applied as asked or not at all."""
    n, k = shape
    if granularity not in ("row_groups", "k_groups", "tensor"):
        raise ValueError(f"unknown granularity {granularity!r}")
    if bits == 4 and k % 2:
        raise ValueError(f"INT4 packs two values per byte along K, so K must be even, got K={k}")
    if granularity == "row_groups" and num_groups is not None:
        if num_groups > n:
            raise ValueError(f"num_groups={num_groups} is more than the {n} output rows")
        if n % num_groups:
            raise ValueError(f"num_groups={num_groups} does not divide the {n} output rows")
    gk = weight_group_k(shape, granularity, group_size)
    if granularity == "k_groups":
        if gk > k:
            raise ValueError(f"group_size={gk} is larger than K={k} (the scales would have one group per row)")
        if k % gk:
            raise ValueError(f"group_size={gk} does not divide K={k}")
    return gk


def quantize_weight(w: torch.Tensor, bits: int, granularity: str = "row_groups",
                    num_groups: int | None = None, group_size: int | None = None,
                    chunk_elems: int = 1 << 24, two_level: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] float -> (wq int8 [N, K] or packed uint8 [N, K/2], scale fp32 [N, K // group_k]).

    Rows are quantized `chunk_elems` elements at a time (whole row groups), so the fp32 temporaries of a large
    weight (Llama-3-8B's gate+up, 28672 x 4096) are 64 MiB, not 2 GiB, at the compile's peak; every element is
    computed exactly as in one piece. Shape errors (groups not fitting the dims) raise ValueError; callers add
    the module name."""
    scale = weight_scales(w, bits, granularity, num_groups, group_size, chunk_elems, two_level)
    return quantize_with_scales(w, scale, bits, chunk_elems), scale


def _rows_per_group(n: int, granularity: str, num_groups: int | None) -> int:
    return n // (n if num_groups is None else num_groups) if granularity == "row_groups" else 1


def _row_chunks(n: int, k: int, rows_per_group: int, chunk_elems: int) -> list[tuple[int, int]]:
    step = max(rows_per_group, chunk_elems // max(k, 1) // rows_per_group * rows_per_group)
    return [(r, min(r + step, n)) for r in range(0, n, step)]


def weight_scales(w: torch.Tensor, bits: int, granularity: str = "row_groups", num_groups: int | None = None,
                  group_size: int | None = None, chunk_elems: int = 1 << 24, two_level: bool = False) -> torch.Tensor:
    """The fp32 scales [N, K // group_k] quantize_weight gives W [N, K] (amax / qmax per group, read in row
    chunks); two_level (INT4 K groups): those rounded up by two_level_scales."""
    if two_level and (bits != 4 or granularity != "k_groups"):
        raise ValueError(f"two-level scales are for INT4 K groups, got INT{bits} {granularity}")
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    gk = check_weight_groups((n, k), bits, granularity, num_groups, group_size)
    w = w.detach()
    rows_per_group = _rows_per_group(n, granularity, num_groups)
    chunks = _row_chunks(n, k, rows_per_group, chunk_elems)

    def row_amax(r0: int, r1: int) -> torch.Tensor:  # [rows, K // gk] (gk = K for whole rows)
        wf = w[r0:r1].float()
        return wf.reshape(r1 - r0, k // gk, gk).abs().amax(dim=2)

    if granularity == "tensor":
        amax = torch.stack([row_amax(r0, r1).amax() for r0, r1 in chunks]).amax().clamp_min(EPS).expand(n, 1)
    elif granularity == "row_groups":
        amax = torch.cat([row_amax(r0, r1) for r0, r1 in chunks]).reshape(n // rows_per_group, rows_per_group)
        amax = amax.amax(dim=1).clamp_min(EPS).repeat_interleave(rows_per_group).reshape(n, 1)
    else:
        amax = torch.cat([row_amax(r0, r1) for r0, r1 in chunks]).clamp_min(EPS)
    scale = (amax / QMAX[bits]).contiguous()
    return two_level_scales(scale) if two_level else scale


TWO_LEVEL_MAX = 15  # two-level K-group scales: u x base_row with u in 1..15, so code x u fits int8 (7 x 15 = 105)


def two_level_scales(scale: torch.Tensor) -> torch.Tensor:
    """K-group scales [N, G] rounded up to u x base (QServe's progressive group quantization): base_row =
    max_g scale / TWO_LEVEL_MAX with its 4 lowest mantissa bits rounded up (so u x base, u < 16, is exact in fp32)
    and u = ceil(scale / base) in 1..TWO_LEVEL_MAX. No code is clipped (every scale only grows); the row's
    largest group gets u = TWO_LEVEL_MAX, so base = max_g / TWO_LEVEL_MAX is exact again from the result."""
    base = two_level_base(scale).contiguous()
    base = ((base.view(torch.int32) + 0xF) & ~0xF).view(torch.float32)
    u = torch.ceil(scale.float() / base).clamp_(1, TWO_LEVEL_MAX)
    return (u * base).contiguous()


def two_level_base(scale: torch.Tensor) -> torch.Tensor:
    """Each row's max_g scale / TWO_LEVEL_MAX [N, 1] fp32, correctly rounded on every device (a tensor divisor:
    CUDA turns a division by a Python number into a product with its rounded reciprocal)."""
    m = scale.float().amax(dim=1, keepdim=True)
    return m / torch.full_like(m, TWO_LEVEL_MAX)


def is_two_level(scale: torch.Tensor) -> bool:
    """Whether K-group scales [N, G] are two_level_scales' form: every scale an integer multiple (1..15) of its
    row's max / TWO_LEVEL_MAX, exactly."""
    s = scale.float()
    u = s / two_level_base(s)
    return bool(((u == torch.round(u)) & (u >= 1) & (u <= TWO_LEVEL_MAX)).all())


def quantize_with_scales(w: torch.Tensor, scale: torch.Tensor, bits: int,
                         chunk_elems: int = 1 << 24) -> torch.Tensor:
    """W [N, K] rounded on given scales [N, K // group_k] -> int8 [N, K] (or packed INT4 [N, K/2])."""
    n, k = w.shape
    qmax, gk = QMAX[bits], k // scale.shape[1]
    w, scale = w.detach(), scale.to(w.device)
    # new_empty, not torch.empty: made like w, so a fake w (a streamed compile's skeleton) gives a fake q
    q = w.new_empty((n, k // 2 if bits == 4 else k), dtype=torch.uint8 if bits == 4 else torch.int8)
    for r0, r1 in _row_chunks(n, k, 1, chunk_elems):
        qc = torch.round(w[r0:r1].float() / scale[r0:r1].repeat_interleave(gk, dim=1)).clamp_(-qmax, qmax)
        q[r0:r1] = pack_int4(qc.to(torch.int8)) if bits == 4 else qc.to(torch.int8)
    return q


def quantize_weight_fp8(w: torch.Tensor, chunk_elems: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] float -> (float8_e4m3fn [N, K], fp32 scale [N, 1] = max|w_row| / 448), in row chunks."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    scale = fp8_weight_scales(w, chunk_elems)
    return quantize_fp8_with_scales(w, scale, chunk_elems), scale


def fp8_weight_scales(w: torch.Tensor, chunk_elems: int = 1 << 24) -> torch.Tensor:
    n, k = w.shape
    amax = torch.cat([w[r0:r1].detach().float().abs().amax(dim=1, keepdim=True)
                      for r0, r1 in _row_chunks(n, k, 1, chunk_elems)])
    return (amax.clamp_min(EPS) / FP8_MAX).contiguous()


def quantize_fp8_with_scales(w: torch.Tensor, scale: torch.Tensor, chunk_elems: int = 1 << 24) -> torch.Tensor:
    n, k = w.shape
    w, scale = w.detach(), scale.to(w.device)
    q = w.new_empty((n, k), dtype=FP8_DTYPE)  # like w: a fake w (a streamed compile) gives a fake q
    for r0, r1 in _row_chunks(n, k, 1, chunk_elems):
        q[r0:r1] = to_fp8(w[r0:r1].float() / scale[r0:r1])
    return q


def quantize_weight_fp8_shard(full: torch.Tensor, shard: torch.Tensor, dim: int,
                              start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_weight_fp8(full) sliced to the tensor-parallel `shard` (rows: dim 0, K: dim 1): row scales
    follow their rows and come whole from `full` on a K slice."""
    scale = fp8_weight_scales(shard) if dim == 0 else fp8_weight_scales(full).to(shard.device)
    return quantize_fp8_with_scales(shard, scale), scale


def check_shard_groups(shape: tuple[int, int], dim: int, start: int, size: int, bits: int, granularity: str,
                       num_groups: int | None = None, group_size: int | None = None) -> int:
    """The K-group size of the full [N, K] weight (check_weight_groups) when the slice [start, start + size) of
    dim (0: rows, 1: K) keeps every group whole; ValueError when it cuts a K group, a row group or an INT4 byte."""
    n, k = shape
    gk = check_weight_groups(shape, bits, granularity, num_groups, group_size)
    rows_per_group = _rows_per_group(n, granularity, num_groups)
    if dim == 0 and (start % rows_per_group or size % rows_per_group):
        raise ValueError(f"rows {start}..{start + size} of {n} cut a row group of {rows_per_group} rows")
    if dim == 1 and granularity == "k_groups" and (start % gk or size % gk):
        raise ValueError(f"K {start}..{start + size} of {k} cuts a K group of {gk}")
    if dim == 1 and bits == 4 and (start % 2 or size % 2):
        raise ValueError(f"K {start}..{start + size} of {k} splits a packed INT4 byte (two values along K)")
    return gk


def quantize_weight_shard(full: torch.Tensor, shard: torch.Tensor, dim: int, start: int, bits: int,
                          granularity: str = "row_groups", num_groups: int | None = None,
                          group_size: int | None = None, two_level: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_weight(full) sliced to `shard` = full.narrow(dim, start, shard.shape[dim]), computed on the shard:
    a tensor-parallel rank's weight and scales are exactly its slice of the single-process ones. Row scales
    follow their rows (dim 0) and are whole on every K slice (dim 1: computed from `full`); K-group scales
    follow their K slice. ValueError when the slice cuts a K group, a row group or a packed INT4 byte."""
    size = shard.shape[dim]
    gk = check_shard_groups(tuple(full.shape), dim, start, size, bits, granularity, num_groups, group_size)
    rows_per_group = _rows_per_group(full.shape[0], granularity, num_groups)
    if two_level and dim == 1:  # a two-level base is the whole row's: the K slice of the full weight's scales
        scale = weight_scales(full, bits, granularity, num_groups, gk, two_level=True)
        scale = scale[:, start // gk:(start + size) // gk].to(shard.device).contiguous()
    elif granularity == "k_groups" or (granularity == "row_groups" and dim == 0):
        # every group lies inside the shard: its own scales are the slice of the full weight's
        groups = None if num_groups is None or granularity != "row_groups" else size // rows_per_group
        scale = weight_scales(shard, bits, granularity, groups, gk if granularity == "k_groups" else None,
                              two_level=two_level)
    else:  # whole-row or per-tensor scales of a K slice, or a per-tensor scale: from the full weight
        scale = weight_scales(full, bits, granularity, num_groups, group_size)
        scale = (scale[start:start + size] if dim == 0 else scale).to(shard.device).contiguous()
    return quantize_with_scales(shard, scale, bits), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    lo = q[:, 0::2].to(torch.int16) & 0xF
    hi = q[:, 1::2].to(torch.int16) & 0xF
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    v = p.to(torch.int16)
    lo = v & 0xF
    hi = (v >> 4) & 0xF
    lo = torch.where(lo >= 8, lo - 16, lo)
    hi = torch.where(hi >= 8, hi - 16, hi)
    return torch.stack([lo, hi], dim=-1).reshape(p.shape[0], p.shape[1] * 2).to(torch.int8)


def weight_int8(wq: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_int4(wq) if bits == 4 else wq


def dequantize_weight(wq: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    q = weight_int8(wq, bits).float()
    gk = q.shape[1] // scale.shape[1]
    return (q * scale.float().repeat_interleave(gk, dim=1)).to(dtype)


def qdq_weight(w: torch.Tensor, bits: int, granularity: str, num_groups: int | None, group_size: int | None,
               fp8: bool, dtype: torch.dtype, two_level: bool = False) -> torch.Tensor:
    """dequantize(quantize(W)) as the engine quantizes it: INT (bits, groups) or FP8 E4M3 per row."""
    if fp8:
        q, scale = quantize_weight_fp8(w)
        return dequantize_weight(q, scale, 8, dtype)
    q, scale = quantize_weight(w, bits, granularity, num_groups, group_size, two_level=two_level)
    return dequantize_weight(q, scale, bits, dtype)


def qdq_tokens(x: torch.Tensor, fp8: bool) -> torch.Tensor:
    """dequantize(quantize_per_token(x)) in x's dtype: INT8 or FP8 E4M3 codes."""
    q, scale = quantize_per_token_fp8(x) if fp8 else quantize_per_token(x)
    return dequantize_rows(q, scale, x.dtype)


# ---- GEMM and epilogues -------------------------------------------------------------------------------
def apply_act(y: torch.Tensor, act: str) -> torch.Tensor:
    if act == "none":
        return y
    if act == "gelu":
        return F.gelu(y)
    if act == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if act == "relu":
        return F.relu(y)
    if act == "silu":
        return F.silu(y)
    raise ValueError(f"unknown activation {act!r}; known: {ACTIVATIONS}")


def epilogue(y: torch.Tensor, bias: torch.Tensor | None, act: str, residual: torch.Tensor | None,
             out_dtype: torch.dtype) -> torch.Tensor:
    """fp32 accumulator (already scaled) -> + bias -> act -> + residual -> out dtype."""
    if bias is not None:
        y = y + bias.float()
    y = apply_act(y, act)
    if residual is not None:
        y = y + residual.float()
    return y.to(out_dtype)


def int_gemm_scaled(xq: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bits: int) -> torch.Tensor:
    """sum over K-groups of (xq @ wq_g^T) * w_scale[:, g]: exact in float64 -> fp32 [..., N]."""
    w = weight_int8(wq, bits).double()
    gk = w.shape[1] // w_scale.shape[1]
    w = w * w_scale.double().repeat_interleave(gk, dim=1)
    return (xq.double() @ w.t()).float()


def int8_gemm_dequant(xq, x_scale, wq, w_scale, bias, residual, act: str, w_bits: int, out_dtype):
    return epilogue(int_gemm_scaled(xq, wq, w_scale, w_bits) * x_scale.float(), bias, act, residual, out_dtype)


def fp8_gemm_dequant(xq, x_scale, wq, w_scale, bias, residual, act: str, out_dtype):
    """FP8 x [..., K] times FP8 W [N, K] (row scales [N, 1]): the products of E4M3 values are exact in float64
    (and their sum for any K a model has), so this is dequantize(x) @ dequantize(W)^T up to the scale roundings."""
    return int8_gemm_dequant(xq, x_scale, wq, w_scale, bias, residual, act, 8, out_dtype)


def weight_only_gemm(x, wq, w_scale, bias, residual, act: str, w_bits: int):
    w = dequantize_weight(wq, w_scale, w_bits, torch.float32)
    return epilogue(x.float() @ w.t(), bias, act, residual, x.dtype)


# ---- producers that the quantization fuses into -------------------------------------------------------
def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, kind: str) -> torch.Tensor:
    if kind == "layer":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    if kind == "rms":
        # Hugging Face LlamaRMSNorm: normalise in fp32, cast back, then scale.
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return weight * y
    raise ValueError(f"unknown norm kind {kind!r}")


def act_producer(x: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor | None, act: str) -> torch.Tensor:
    """act(x + bias), or act(gate) * x when gate is given (SiLU-gated MLPs)."""
    if bias is not None:
        x = x + bias
    if gate is not None:
        return apply_act(gate, act) * x
    return apply_act(x, act)


# ---- attention around a KV cache (generation graphs) ----------------------------------------------------
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (the rotate-half form of LLaMA / Qwen2 / Mistral): x [B, H, S, D],
    cos / sin broadcastable to it ([B, 1, S, D]), in x's dtype like Hugging Face computes it."""
    return x * cos + rotate_half(x) * sin


def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention with grouped KV heads: q [B, Hq, S, D], k / v [B, Hkv, L, D] (Hq % Hkv == 0, query head
    h reads KV head h // (Hq / Hkv)), boolean mask [B, 1 or Hq, S, L] (True = attend) -> [B, Hq, S, D]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _codes(x: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x (fp32, last dim) -> (their INT8 or FP8 E4M3 codes as fp32, the per-row scale [..., 1])."""
    q, scale = quantize_per_token_fp8(x) if fp8 else quantize_per_token(x)
    return q.float(), scale


def _head_codes(x: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, T, D] fp32 -> (codes [B, H, T, D] as fp32, one scale per (batch row, head) [B, H, 1, 1])."""
    b, h, t, d = x.shape
    q, scale = _codes(x.reshape(b, h, t * d), fp8)
    return q.reshape(b, h, t, d), scale.reshape(b, h, 1, 1)


def quant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                    is_causal: bool, fp8: bool, per_token: bool = False, pv_fp8: bool | None = None) -> torch.Tensor:
    """ZeroQuant-HERO's quantized attention: softmax(Q.K^T * scale) . V with both products on 8-bit codes.
    q [B, Hq, S, D], k / v [B, Hkv, L, D] (Hq % Hkv == 0: query head h reads KV head h // (Hq / Hkv)); mask
    None, boolean (True = attend) or additive float, broadcastable to [B, Hq, S, L]; is_causal: query i sees
    key j <= i + L - S (an additive mask's values at or under half the dtype's lowest count as masked, as Hugging
    Face writes them). Dynamic scales: per_token False: Q, K and V one per (batch row, head); per_token True: Q
    and K one per token (row) of each head, V one per channel of each head -- the scales an INT8 GEMM applies in
    its epilogue (rows of Q.K^T by Q's, columns by K's; columns of P.V by V's). K and V over the key slots some
    query attends (a preallocated cache's unused slots set no scale); the softmax output P one per query row (P
    in [0, 1]). INT8 codes (scale = max / 127) or FP8 E4M3 (max / 448): `fp8` for Q.K^T, `pv_fp8` for P.V (None:
    as Q.K^T). The products run on the codes in fp32 and are rescaled after; a row that attends nothing gives
    zeros. Returns q's dtype."""
    pv_fp8 = fp8 if pv_fp8 is None else pv_fp8
    groups = q.shape[1] // k.shape[1]
    s_len, l_len = q.shape[2], k.shape[2]
    bias = torch.zeros((1, 1, s_len, l_len), dtype=torch.float32, device=q.device)
    if is_causal:
        keep = torch.ones((s_len, l_len), dtype=torch.bool, device=q.device).tril(l_len - s_len)
        bias = bias.masked_fill(~keep, float("-inf"))
    if mask is not None:
        bias = bias + (torch.zeros_like(mask, dtype=torch.float32).masked_fill(~mask, float("-inf"))
                       if mask.dtype == torch.bool else mask.float())
    bias = bias.expand(q.shape[0], q.shape[1], s_len, l_len)
    # masked: -inf, or an additive mask's "minus infinity" (Hugging Face fills with the dtype's lowest value)
    attended = bias > torch.finfo(q.dtype).min / 2
    seen = attended.reshape(q.shape[0], k.shape[1], groups * s_len, l_len).any(dim=2)  # [B, Hkv, L]
    kv_keep = seen[..., None].float()
    if per_token:
        qc, sq = _codes(q.float(), fp8)  # [B, Hq, S, 1]
        kc, sk = _codes(k.float() * kv_keep, fp8)
        vt, svt = _codes((v.float() * kv_keep).transpose(-1, -2), pv_fp8)  # V's channels as rows: [B, Hkv, D, 1]
        vc, sv, sk = vt.transpose(-1, -2), svt.transpose(-1, -2), sk.transpose(-1, -2)  # sv [.., 1, D], sk [.., 1, L]
    else:
        qc, sq = _head_codes(q.float(), fp8)
        kc, sk = _head_codes(k.float() * kv_keep, fp8)
        vc, sv = _head_codes(v.float() * kv_keep, pv_fp8)
    if groups > 1:
        kc, sk, vc, sv = (t.repeat_interleave(groups, dim=1) for t in (kc, sk, vc, sv))
    scores = (qc @ kc.transpose(-1, -2)) * (sq * sk * scale) + bias
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with every slot masked: zeros
    pc, sp = _codes(p, pv_fp8)
    return ((pc @ vc) * (sp * sv)).to(q.dtype)
