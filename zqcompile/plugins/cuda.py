"""The CUDA implementations of the zq ops: thin ctypes wrappers over libzq_kernels.so's C launch API
(plugins_cuda/include/zq/*.h). Each is recorded against its op declaration with `@cuda_kernel(name)` at import;
`register()` binds the recorded kernels to the "cuda" dispatch key once the library loads. The GEMM wrappers,
which launch the kernel the one chooser picked, are in plugins/cuda_gemm.py.

Each wrapper allocates the outputs, launches on the current stream and checks the returned CUDA error. Inputs
the kernels do not cover (unusual dtypes, mixed dtypes) go to the reference implementation, so every call is
answered; such fallbacks are counted per (op, reason) in `fallbacks` and warned about once, and `describe()`,
the attention path counter and cuda_gemm.served say what ran.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from zqcompile.ops import quant_math as qm
from zqcompile.ops import registry
from zqcompile.ops.registry import cuda_kernel

ABI_VERSION = 16  # plugins_cuda/include/zq/common.h ZQ_ABI_VERSION
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # zq_dtype of the float tensors the kernels take
FP8_E4M3 = 3  # zq_dtype ZQ_FP8_E4M3: only the x_dt of an FP8 GEMM (not in DTYPES: no kernel reads FP8 rows)

_lib: Optional[ctypes.CDLL] = None
_path: Optional[Path] = None


def _env(name: str, default: str, choices: tuple[str, ...], what: str) -> str:
    """An environment switch of the kernels, read at import: one of `choices`, else one line saying so."""
    value = os.environ.get(name, default)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)} ({what}), got {value!r}")
    return value


def _env_rows(name: str, unit: str = "a row count") -> int:
    value = os.environ.get(name, "-1")
    if not value.lstrip("-").isdigit() or int(value) < -1:
        raise ValueError(f"{name} must be -1 (the library's choice), 0 (never) or {unit}, got {value!r}")
    return int(value)
# (op, reason) -> calls on a CUDA tensor that took a slower path than the planned kernel: the reference
# implementation (inputs no kernel covers), or a GEMM kernel's fallback after it declined at run time. Each new
# pair warns once, so a slow path is never silent; engine.report() shows the counts.
fallbacks: Counter = Counter()


def note_fallback(op: str, why: str, what: str = "") -> None:
    """Count (op, why); warn the first time, saying `what` happened (default: why)."""
    key = (op, why)
    if key not in fallbacks:
        warnings.warn(f"zq CUDA kernels: {what or f'{op}: {why}'}; inputs like these are slower than the planned "
                      f"kernel (counts: zqcompile.plugins.cuda.fallbacks, shown by engine.report())", RuntimeWarning,
                      stacklevel=4)
    fallbacks[key] += 1


def _fallback(op: str, why: str, *args):
    """Run op's reference implementation for inputs no kernel covers, counted and warned about once."""
    note_fallback(op, why, f"{op} ran its reference implementation ({why})")
    return _ref(op)(*args)


attention_paths: Counter = Counter()  # "rope" / "decode_attention" (kernels) or "<op>_reference"
# One-token attention: "split" runs the split-L (flash-decoding) kernel at every cache length; "single" the
# one-block-per-(row, query head) kernel where its scores fit in shared memory, split-L past that (A/B in
# benchmarks; env ZQ_DECODE_ATTENTION). decode_attention_splits: 0 = the library's choice (tests force counts).
decode_attention_path = _env("ZQ_DECODE_ATTENTION", "split", ("split", "single"), "the one-token attention kernel")
decode_attention_splits = 0  # -2: the library's earlier two-blocks-an-SM rule (A/B)
# zq.rope_kv_write: "fused" runs RoPE and the KV-cache write in one kernel (zq_rope_kv); "split" runs the zq_rope
# kernel and two index_copy_ (what the graph did before the fusion; A/B in benchmarks). "fused" is the default
# since tests/gpu/test_rope_kv_gpu.py passed on the H200 (39 tests, bench/results/gpu_tests_rope_kv_H200.txt:
# 8B W8A8 decode 3.99 -> 3.80 ms/token at batch 1, 5.42 -> 4.85 at batch 16, 64 kernels a step fewer); env
# ZQ_ROPE_KV.
rope_kv_path = _env("ZQ_ROPE_KV", "fused", ("fused", "split"), "RoPE and the KV-cache write in one kernel or two")
# Per-token row kernels (quantize_per_token, norm_quant, act_quant) on sm_90+: rows at or under which a row of
# K > 1024 is split over a cluster of 8 blocks (decode: one row would otherwise be one SM's work). -1: the
# library's choice (act_quant only, 8 x rows <= 2 x SMs: 1.5-1.7x faster at M <= 33 on the H200, where the
# others were slower split), 0: never (one block a row, A/B), n: up to n rows, every row kernel (tests).
# Set with set_row_split (env ZQ_ROW_SPLIT at load).
row_split_rows = _env_rows("ZQ_ROW_SPLIT")
# Programmatic dependent launch of the library's kernels (plugins_cuda/include/zq/launch.cuh) on sm_90+: each
# kernel is scheduled while the one ahead of it finishes and waits for it on the device (griddepcontrol), so the
# launch gaps of a decode step's CUDA graph overlap the kernels. -1: on where the device supports it (default),
# 0: off (A/B). Set with set_pdl (env ZQ_PDL at load); graphs captured before keep their launches.
pdl_mode = int(_env("ZQ_PDL", "-1", ("-1", "0", "1"), "programmatic dependent launch: default, off, on"))
# act_quant reading x and gate in place when they are rows with a common pitch (the two halves of the fused
# gate/up GEMM's output: at batch > 1 each is a strided view, and copying both to contiguous tensors was two copy
# kernels a layer, 64 of the 68 torch kernels of an 8B batch-16 decode step). On by default: H200, 8B W8A8, same
# engine off / on interleaved (bench/results/decode_scale_8b_act_strided_H200.md): b16 1.04x, b64 1.07x, b1 1.0x
# (a single row is contiguous: nothing changes there). ZQ_ACT_QUANT_STRIDED=0: the copies, as before.
# Split-L decode attention with 2-8 splits merges them inside its kernel ("cluster": the splits of a (row, KV
# head) as one thread-block cluster, sm_90+) or with a second, combine kernel ("kernel": A/B). Set with
# set_attention_merge (env ZQ_ATTENTION_MERGE at load).
attention_merge = _env("ZQ_ATTENTION_MERGE", "cluster", ("cluster", "kernel"), "where split-L merges its splits")
# The decode-shaped GEMM's L2 prefetch of its weight rows before its PDL wait (zq_set_gemm_prefetch): the blocks
# whose rows end within this many bytes of the weight's start. -1: the library's choice (none: on the H200 no
# budget of 1-25 MB was faster, 12 MB and more 4-8 % slower, bench/results/decode_scale_8b_prefetch_sweep_H200.md),
# 0: none, n: n bytes (A/B). Results never change. Set with set_gemm_prefetch (env ZQ_GEMM_PREFETCH at load).
gemm_prefetch_bytes = _env_rows("ZQ_GEMM_PREFETCH", "a byte count")
act_quant_strided = _env("ZQ_ACT_QUANT_STRIDED", "1", ("0", "1"), "act_quant reading gate / up in place") == "1"
CUDA_ERROR_NOT_SUPPORTED = 801  # cudaErrorNotSupported: the kernel declined the inputs, nothing was launched


def _bind(lib: ctypes.CDLL, only: tuple[str, ...] | None = None) -> None:
    """Set the C signatures of the library's functions (`only` these: a partial build, e.g. the row kernels of
    another checkout that bench_elementwise --ab-lib times beside this one)."""
    P, I, I64, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    sigs = {
        "zq_abi_version": (I, []), "zq_has_sm90_gemm": (I, []), "zq_gemm_sm90_num_configs": (I, []),
        "zq_set_row_split": (None, [I]), "zq_set_pdl": (None, [I]), "zq_set_gemm_prefetch": (None, [I64]),
        "zq_set_attention_merge": (None, [I]),
        "zq_error_string": (ctypes.c_char_p, [I]),
        "zq_quantize_per_token": (I, [P, I, I64, I64, P, P, P]),
        "zq_quantize_per_token_fp8": (I, [P, I, I64, I64, P, P, P]),
        "zq_quantize_per_tensor": (I, [P, I, I64, I64, P, P, P, P]),
        "zq_norm_quant": (I, [P, P, P, P, I, I64, I64, F, I, P, P, P, P, P]),
        "zq_norm_quant_fp8": (I, [P, P, P, P, I, I64, I64, F, I, P, P, P, P, P]),
        "zq_act_quant": (I, [P, P, P, I, I64, I64, I64, I, P, P, P, P]),
        "zq_act_quant_fp8": (I, [P, P, P, I, I64, I64, I64, I, P, P, P, P]),
        "zq_gemm_run": (I, [I, P, P, ctypes.c_size_t, P]), "zq_gemm_workspace_bytes": (ctypes.c_size_t, [I, I64, I64, I]),
        "zq_gemm_kernel_name": (ctypes.c_char_p, [I]), "zq_gemm_kernel_available": (I, [I]),
        "zq_gemm_sm90_config": (I, [P, I, P]), "zq_gemm_mma_config": (I, [P, I, P]),
        "zq_gemm_sm90_fp8": (I, [P, P]), "zq_gemm_sm90_fp8_config": (I, [P, I, P]),
        "zq_gemm_sm90_fp8_num_configs": (I, []),
        "zq_gemm_mma_num_configs": (I, []), "zq_gemm_skinny_config": (I, [P, I, P]),
        "zq_gemm_skinny_num_configs": (I, []), "zq_gemm_wgmma_config": (I, [P, I, P]),
        "zq_gemm_wgmma_num_configs": (I, []),
        "zq_dequantize_weight": (I, [P, I, P, I64, I64, I64, P, I, P]),
        "zq_unpack_int4_two_level": (I, [P, P, I64, I64, I64, P, P, P]),
        "zq_rope": (I, [P, P, P, P, P, P, I, I64, I64, I64, I64, I64, P, P, P]),
        "zq_rope_kv": (I, [P, P, P, P, P, P, P, P, I, I64, I64, I64, I64, I64, P, P, P, P, P, I64, P, P]),
        "zq_decode_attention": (I, [P, I64, I64, P, P, P, I, I64, I64, I64, I64, I64, F, P, P]),
        "zq_decode_attention_splits": (I64, [I64, I64, I64, I64, I64]),
        "zq_decode_attention_workspace_bytes": (ctypes.c_size_t, [I64, I64, I64, I64, I64, I64]),
        "zq_decode_attention_split": (I, [P, I64, I64, P, P, P, I, I64, I64, I64, I64, I64, F, I64, P,
                                          ctypes.c_size_t, P, P]),
    }
    for name, (res, args) in sigs.items():
        if only is not None and name not in only:
            continue
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"zq CUDA kernel {what} failed: {_lib.zq_error_string(rc).decode()} (cudaError {rc})")


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None or t.numel() == 0 else t.data_ptr()


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def has_sm90_gemm() -> bool:
    return bool(_lib.zq_has_sm90_gemm())


def describe() -> str:
    return f"{_path} (Hopper INT8 / FP8 GEMMs: {'yes' if has_sm90_gemm() else 'no'})"


# ---- activation quantization -------------------------------------------------------------------------
def _codes(x: Tensor, fp8: bool) -> Tensor:
    """The per-token codes of x: int8, or float8_e4m3fn bytes (the *_fp8 kernels)."""
    return torch.empty(x.shape, dtype=qm.FP8_DTYPE if fp8 else torch.int8, device=x.device)


def _quantize_per_token(op: str, x: Tensor) -> tuple[Tensor, Tensor]:
    if x.dtype not in DTYPES or x.numel() == 0:
        return _ref(op)(x)
    x = x.contiguous()
    k = x.shape[-1]
    q = _codes(x, op.endswith("_fp8"))
    s = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        _check(getattr(_lib, f"zq_{op}")(x.data_ptr(), DTYPES[x.dtype], x.numel() // k, k, q.data_ptr(),
                                          s.data_ptr(), _stream(x)), op)
    return q, s


@cuda_kernel("quantize_per_token")
def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    return _quantize_per_token("quantize_per_token", x)


@cuda_kernel("quantize_per_token_fp8")
def quantize_per_token_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    return _quantize_per_token("quantize_per_token_fp8", x)


@cuda_kernel("quantize_per_tensor")
def quantize_per_tensor(x: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    if x.dtype not in DTYPES or x.numel() == 0:
        return qm.quantize_per_tensor(x, scale)
    x = x.contiguous()
    sc = scale.to(device=x.device, dtype=torch.float32).reshape(()).contiguous()
    k = x.shape[-1]
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    s = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        _check(_lib.zq_quantize_per_tensor(x.data_ptr(), DTYPES[x.dtype], x.numel() // k, k, sc.data_ptr(),
                                           q.data_ptr(), s.data_ptr(), _stream(x)), "quantize_per_tensor")
    return q, s


# ---- producers fused with quantization -----------------------------------------------------------------
def _same_dtype(x: Tensor, *others: Optional[Tensor]) -> bool:
    return x.dtype in DTYPES and all(o is None or (o.dtype == x.dtype and o.device == x.device) for o in others)


def _norm_quant(op, x, residual, weight, bias, eps, kind, emit_out, emit_sum):
    k = x.shape[-1]
    if x.numel() == 0:
        return _ref(op)(x, residual, weight, bias, eps, kind, emit_out, emit_sum)
    if not _same_dtype(x, residual, weight, bias) or k > 56 * 1024 or kind not in ("layer", "rms"):
        return _fallback(op, "mixed or fp64 dtypes, rows over 56K, or an unknown norm", x, residual, weight,
                         bias, eps, kind, emit_out, emit_sum)
    x = x.contiguous()
    residual = None if residual is None else residual.contiguous()
    q = _codes(x, op.endswith("_fp8"))
    s = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    out = torch.empty_like(x) if emit_out else x.new_empty((0,))
    hsum = torch.empty_like(x) if emit_sum and residual is not None else x.new_empty((0,))
    with torch.cuda.device(x.device):
        _check(getattr(_lib, f"zq_{op}")(x.data_ptr(), _ptr(residual), weight.contiguous().data_ptr(),
                                          _ptr(None if bias is None else bias.contiguous()), DTYPES[x.dtype],
                                          x.numel() // k, k, float(eps), int(kind == "rms"), q.data_ptr(),
                                          s.data_ptr(), _ptr(out), _ptr(hsum), _stream(x)), op)
    return q, s, out, hsum


@cuda_kernel("norm_quant")
def norm_quant(x, residual, weight, bias, eps, kind, emit_out, emit_sum):
    return _norm_quant("norm_quant", x, residual, weight, bias, eps, kind, emit_out, emit_sum)


@cuda_kernel("norm_quant_fp8")
def norm_quant_fp8(x, residual, weight, bias, eps, kind, emit_out, emit_sum):
    return _norm_quant("norm_quant_fp8", x, residual, weight, bias, eps, kind, emit_out, emit_sum)


def _act_quant(op, x, bias, gate, act, emit_out):
    k = x.shape[-1]
    if x.numel() == 0:
        return _ref(op)(x, bias, gate, act, emit_out)
    if not _same_dtype(x, bias, gate) or k > 56 * 1024:
        return _fallback(op, "mixed or fp64 dtypes, or rows over 56K", x, bias, gate, act, emit_out)
    xr, gr, ld = _pitched_rows(x, gate, k) if act_quant_strided else (None, None, k)
    if xr is None:
        xr, gr, ld = x.contiguous(), None if gate is None else gate.contiguous(), k
    q = _codes(x, op.endswith("_fp8"))
    s = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if emit_out else x.new_empty((0,))
    with torch.cuda.device(x.device):
        _check(getattr(_lib, f"zq_{op}")(xr.data_ptr(), _ptr(None if bias is None else bias.contiguous()),
                                          _ptr(gr), DTYPES[x.dtype], x.numel() // k, k, ld,
                                          qm.ACTIVATIONS.index(act), q.data_ptr(), s.data_ptr(), _ptr(out),
                                          _stream(x)), op)
    return q, s, out


def _pitched_rows(x: Tensor, gate: Tensor | None, k: int) -> tuple[Tensor | None, Tensor | None, int]:
    """x (and gate) as [rows, k] views in place, with the row pitch they share (>= k: rows never overlap), or
    (None, None, k) when their layout is not that (the caller copies them)."""
    def rows(t):
        try:
            v = t.view(-1, k)
        except RuntimeError:  # the leading dims do not merge into one strided dim
            return None
        return v if v.stride(1) == 1 else None
    xr = rows(x)
    gr = None if gate is None else rows(gate)
    if xr is None or (gate is not None and gr is None):
        return None, None, k
    if xr.shape[0] <= 1:
        return xr, gr, k  # one row: its pitch is never used
    ld = xr.stride(0)
    if ld < k or (gr is not None and gr.stride(0) != ld):
        return None, None, k
    return xr, gr, ld


@cuda_kernel("act_quant")
def act_quant(x, bias, gate, act, emit_out):
    return _act_quant("act_quant", x, bias, gate, act, emit_out)


@cuda_kernel("act_quant_fp8")
def act_quant_fp8(x, bias, gate, act, emit_out):
    return _act_quant("act_quant_fp8", x, bias, gate, act, emit_out)


# ---- attention around the KV cache (generation graphs) ---------------------------------------------------
def _int64s(values) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


def _rope_fits(q, k, cos, sin) -> bool:
    """What the RoPE kernel (zq_rope, zq_rope_kv) takes: q [B, Hq, S, D] and k [B, Hkv, S, D] in one float dtype
    on one device with cos / sin [B or 1, 1, S, D], D even and <= 512, something to rotate."""
    b, _, s, d = q.shape
    return (q.dtype in DTYPES and all(t.dtype == q.dtype and t.device == q.device for t in (k, cos, sin))
            and k.dim() == 4 and (k.shape[0], k.shape[2], k.shape[3]) == (b, s, d) and d % 2 == 0 and d <= 512
            and all(t.dim() == 4 and t.shape[1:] == (1, s, d) and t.shape[0] in (1, b) for t in (cos, sin))
            and q.numel() > 0)


def _rope_tables(cos, sin, b: int, s: int, d: int) -> tuple[Tensor, Tensor]:
    """cos / sin as the RoPE kernel reads them: [B, S, D] contiguous."""
    return tuple(t.expand(b, 1, s, d).reshape(b, s, d).contiguous() for t in (cos, sin))


@cuda_kernel("rope")
def rope(q, k, cos, sin):
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    if not _rope_fits(q, k, cos, sin):
        attention_paths["rope_reference"] += 1
        if q.numel() == 0:
            return _ref("rope")(q, k, cos, sin)
        return _fallback("rope", "mixed dtypes, odd or > 512 head dim, or cos/sin not [B, 1, S, D]", q, k, cos, sin)
    cos3, sin3 = _rope_tables(cos, sin, b, s, d)
    q_out = torch.empty((b, hq, s, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((b, hkv, s, d), dtype=q.dtype, device=q.device)
    with torch.cuda.device(q.device):
        _check(_lib.zq_rope(q.data_ptr(), _int64s(q.stride()), k.data_ptr(), _int64s(k.stride()), cos3.data_ptr(),
                            sin3.data_ptr(), DTYPES[q.dtype], b, hq, hkv, s, d, q_out.data_ptr(), k_out.data_ptr(),
                            _stream(q)), "rope")
    attention_paths["rope"] += 1
    return q_out, k_out


@cuda_kernel("rope_kv_write")
def rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, slots):
    if rope_kv_path not in ("fused", "split"):
        raise ValueError(f"zqcompile.plugins.cuda.rope_kv_path (env ZQ_ROPE_KV) must be 'fused' or 'split', got "
                         f"{rope_kv_path!r}")
    b, hq, s, d = q.shape
    hkv, l = k.shape[1], k_cache.shape[2]
    fits = (rope_kv_path == "fused" and _rope_fits(q, k, cos, sin)
            and all(t.dtype == q.dtype and t.device == q.device for t in (v, k_cache, v_cache)) and k.shape == v.shape
            and k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.shape[0] == b
            and (k_cache.shape[1], k_cache.shape[3]) == (hkv, d)
            and slots.dtype == torch.int64 and slots.shape == (s,) and slots.device == q.device)
    if not fits:  # the two ops the fusion replaced: RoPE (kernel where it fits), then the cache writes
        attention_paths["rope_kv_split"] += 1
        q_rot, k_rot = rope(q, k, cos, sin)
        k_cache.index_copy_(2, slots, k_rot.to(k_cache.dtype))
        v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
        return q_rot
    cos3, sin3 = _rope_tables(cos, sin, b, s, d)
    q_out = torch.empty((b, hq, s, d), dtype=q.dtype, device=q.device)
    slots = slots.contiguous()
    with torch.cuda.device(q.device):
        _check(_lib.zq_rope_kv(q.data_ptr(), _int64s(q.stride()), k.data_ptr(), _int64s(k.stride()), v.data_ptr(),
                               _int64s(v.stride()), cos3.data_ptr(), sin3.data_ptr(), DTYPES[q.dtype], b, hq, hkv, s,
                               d, slots.data_ptr(), k_cache.data_ptr(), _int64s(k_cache.stride()),
                               v_cache.data_ptr(), _int64s(v_cache.stride()), l, q_out.data_ptr(), _stream(q)),
               "rope_kv")
    attention_paths["rope_kv"] += 1
    return q_out


@cuda_kernel("gqa_attention")
def gqa_attention(q, k, v, mask, scale):
    b, hq, s, d = q.shape
    hkv, l = k.shape[1], k.shape[2]
    fits = (s == 1 and q.dtype in DTYPES and all(t.dtype == q.dtype and t.device == q.device for t in (k, v))
            and k.shape == v.shape == (b, hkv, l, d) and hq % hkv == 0 and d % 8 == 0 and d <= 256
            and mask.dtype == torch.bool and mask.device == q.device and mask.dim() == 4
            and mask.shape[1:] == (1, 1, l) and mask.shape[0] in (1, b) and b > 0)
    if fits:
        # one token per row: its mask row [B, L] as bytes; q read in place when its heads are 16-byte aligned
        m = mask.expand(b, 1, 1, l).reshape(b, l).contiguous().view(torch.uint8)
        q_sb, q_sh = (q.stride(0) if b > 1 else 0), (q.stride(1) if hq > 1 else 0)
        if q.stride(3) != 1 or q_sb % 8 or q_sh % 8 or q.data_ptr() % 16:
            q = q.contiguous()
            q_sb, q_sh = hq * d, d
        k, v = k.contiguous(), v.contiguous()
        out = torch.empty((b, hq, 1, d), dtype=q.dtype, device=q.device)
        with torch.cuda.device(q.device):
            path = _decode_attention(q, q_sb, q_sh, k, v, m, scale, out)
        if path is not None:  # None: e.g. a cache slice that is not 16-byte aligned
            attention_paths["decode_attention"] += 1
            attention_paths[f"decode_attention_{path}"] += 1
            return out
    attention_paths["gqa_attention_reference"] += 1
    if s > 1 or b == 0:  # prefill: SDPA (the kernel is for one query token per row)
        return _ref("gqa_attention")(q, k, v, mask, scale)
    return _fallback("gqa_attention", "one-token attention outside the kernel's contract (dtype, head dim, mask "
                     "shape or alignment)", q, k, v, mask, scale)


def _decode_attention(q, q_sb, q_sh, k, v, m, scale, out) -> Optional[str]:
    """Launch one-token attention into `out`: the kernel that ran ("single" / "split"), None if both declined."""
    b, hq, _, d = q.shape
    hkv, l = k.shape[1], k.shape[2]
    args = (q.data_ptr(), q_sb, q_sh, k.data_ptr(), v.data_ptr(), m.data_ptr(), DTYPES[q.dtype], b, hq, hkv, l, d,
            float(scale))
    if decode_attention_path not in ("split", "single"):
        raise ValueError(f"zqcompile.plugins.cuda.decode_attention_path (env ZQ_DECODE_ATTENTION) must be 'split' or "
                         f"'single', got {decode_attention_path!r}")
    if decode_attention_path == "single":
        rc = _lib.zq_decode_attention(*args, out.data_ptr(), _stream(q))
        if rc != CUDA_ERROR_NOT_SUPPORTED:  # declined: scores past shared memory; split-L takes any length
            _check(rc, "decode_attention")
            return "single"
    splits = decode_attention_splits
    nbytes = _lib.zq_decode_attention_workspace_bytes(b, hq, hkv, l, d, splits)
    ws = torch.empty(nbytes, dtype=torch.uint8, device=q.device) if nbytes else None
    rc = _lib.zq_decode_attention_split(*args, splits, _ptr(ws), nbytes, out.data_ptr(), _stream(q))
    if rc == CUDA_ERROR_NOT_SUPPORTED:
        return None
    _check(rc, "decode_attention_split")
    return "split"


def set_row_split(max_rows: int) -> None:
    """Rows at or under which the row kernels split a long row over a cluster (row_split_rows); process-wide.
    Takes effect for kernels launched (or CUDA graphs captured) after the call."""
    global row_split_rows
    row_split_rows = int(max_rows)
    if _lib is not None:
        _lib.zq_set_row_split(row_split_rows)


def set_pdl(mode: int) -> None:
    """Programmatic dependent launch on (-1 / 1) or off (0) for kernels launched (or CUDA graphs captured)
    after the call (pdl_mode); process-wide."""
    global pdl_mode
    pdl_mode = int(mode)
    if _lib is not None:
        _lib.zq_set_pdl(pdl_mode)


def set_attention_merge(where: str) -> None:
    """Split-L attention's merge of 2-8 splits in the cluster ("cluster") or by the combine kernel ("kernel"),
    for kernels launched (or CUDA graphs captured) after the call; process-wide."""
    global attention_merge
    if where not in ("cluster", "kernel"):
        raise ValueError(f"attention merge must be 'cluster' or 'kernel', got {where!r}")
    attention_merge = where
    if _lib is not None:
        _lib.zq_set_attention_merge(-1 if where == "cluster" else 0)


def set_gemm_prefetch(nbytes: int) -> None:
    """The decode GEMMs' L2 prefetch budget (gemm_prefetch_bytes: -1 the library's choice, 0 none) for kernels
    launched (or CUDA graphs captured) after the call; process-wide."""
    global gemm_prefetch_bytes
    gemm_prefetch_bytes = int(nbytes)
    if _lib is not None:
        _lib.zq_set_gemm_prefetch(gemm_prefetch_bytes)


_SWITCHES = {"pdl": ("pdl_mode", "set_pdl"), "gemm_prefetch": ("gemm_prefetch_bytes", "set_gemm_prefetch"),
             "attention_merge": ("attention_merge", "set_attention_merge"),
             "row_split": ("row_split_rows", "set_row_split")}


@contextlib.contextmanager
def switched(name: str, value):
    """`with switched("pdl", 0):` one of the library's process-wide switches (_SWITCHES: its module variable and
    setter) set for the block and restored after it; A/B measurements and tests."""
    var, setter = _SWITCHES[name]
    before = globals()[var]
    globals()[setter](value)
    try:
        yield
    finally:
        globals()[setter](before)


# ---- registration --------------------------------------------------------------------------------------
def _ref(name: str):
    """The reference implementation of op `name` (the function it was declared with), called directly so a
    fallback never dispatches back here."""
    return registry.op(name).reference


def register(path: Path) -> None:
    """Load the library at `path` and register its kernels for the "cuda" dispatch key (once)."""
    global _lib, _path
    if _lib is not None:
        return
    lib = ctypes.CDLL(str(path))
    lib.zq_abi_version.restype, lib.zq_abi_version.argtypes = ctypes.c_int, []
    if lib.zq_abi_version() != ABI_VERSION:  # before binding: an older library lacks newer symbols
        raise OSError(f"{path} has ABI version {lib.zq_abi_version()}, this zqcompile expects {ABI_VERSION}: "
                      f"rebuild it")
    _bind(lib)
    _lib, _path = lib, path
    set_row_split(row_split_rows)
    set_pdl(pdl_mode)
    set_gemm_prefetch(gemm_prefetch_bytes)
    set_attention_merge(attention_merge)
    for decl in registry.declared(namespace=None):
        if decl.cuda_kernel is not None:
            torch.library.register_kernel(decl.qualname, "cuda", decl.cuda_kernel)


from zqcompile.plugins import cuda_gemm  # noqa: E402,F401 - records the GEMM kernels (they use this module's helpers)
