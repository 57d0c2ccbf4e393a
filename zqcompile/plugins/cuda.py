"""The CUDA implementations of the zq ops: thin ctypes wrappers over libzq_kernels.so's C launch API
(plugins_cuda/include/zq/*.h). Each is recorded against its op declaration with `@cuda_kernel(name)` at import;
`register()` binds the recorded kernels to the "cuda" dispatch key once the library loads.

Each wrapper allocates the outputs, launches on the current stream and checks the returned CUDA error. Inputs
the kernels do not cover (unusual dtypes, mixed dtypes) go to the reference implementation, so every call is
answered; `describe()` and the path counters (GEMMs, attention) say what ran.
"""
from __future__ import annotations

import ctypes
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from zqcompile.ops import quant_math as qm
from zqcompile.ops import registry
from zqcompile.ops.registry import cuda_kernel

ABI_VERSION = 2
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Tokens at or under which the CUDA-core GEMM beats the tensor-core paths (bench/results, H200): for INT8
# weights with row scales the sm90 kernel's ~5 us floor wins from M = 5; with K-group scales the alternative
# was the fp16 path that dequantizes the weight per call, so the CUDA-core kernel keeps M <= 16 (not yet
# re-measured against the mma kernel that now takes K groups: bench/bench_gemm.py).
SMALL_M = 4
SMALL_M_KGROUPS = 16
# Where the mma tensor-core kernel beats the alternatives on Hopper (bench/results/gemm_NVIDIA_H200.md and
# profile_decode_H200.md, H200): row-scaled INT8 at M <= 64 with K <= 1024 (4.2-4.4 us vs 5.0 for the Hopper
# kernel on SmolLM2's decode GEMMs); INT4 row-scaled at M <= 64 (the Hopper kernel needs a per-call unpack,
# which only pays off for larger M); INT4 K-groups up to M = 2048 (4096^2 x 4096: 590 us vs 398 us for the
# fp16 dequant path at M = 4096, 53 vs 122 us at M = 256; the crossover between was not measured).
MMA_ROW_MAX_M = 64
MMA_ROW_MAX_K = 1024
MMA_KGROUP_MAX_M = 2048
CUDA_ERROR_NOT_SUPPORTED = 801  # cudaErrorNotSupported: the kernel does not take this problem

_lib: Optional[ctypes.CDLL] = None
_path: Optional[Path] = None
gemm_paths: Counter = Counter()  # which GEMM path served each call (for reports and tests)
# (op, reason) -> calls that ran the reference implementation on a CUDA tensor instead of a kernel; each new
# pair warns once, so a slow path is never silent.
fallbacks: Counter = Counter()


def _fallback(op: str, why: str, *args):
    """Run op's reference implementation for inputs no kernel covers, counted and warned about once."""
    key = (op, why)
    if key not in fallbacks:
        warnings.warn(f"zq CUDA kernels: {op} ran its reference implementation ({why}); inputs like these are "
                      f"slower than the kernel path (counts: zqcompile.plugins.cuda.fallbacks)", RuntimeWarning,
                      stacklevel=3)
    fallbacks[key] += 1
    return _ref(op)(*args)
attention_paths: Counter = Counter()  # "rope" / "decode_attention" (kernels) or "<op>_reference"
CUDA_ERROR_NOT_SUPPORTED = 801  # cudaErrorNotSupported: the kernel declined the inputs, nothing was launched


class GemmArgs(ctypes.Structure):
    """zq_gemm_args of plugins_cuda/include/zq/gemm.h."""
    _fields_ = [("x", ctypes.c_void_p), ("x_dt", ctypes.c_int), ("x_is_int8", ctypes.c_int),
                ("x_scale", ctypes.c_void_p), ("wq", ctypes.c_void_p), ("w_bits", ctypes.c_int),
                ("w_scale", ctypes.c_void_p), ("groups", ctypes.c_int64), ("bias", ctypes.c_void_p),
                ("residual", ctypes.c_void_p), ("act", ctypes.c_int), ("out", ctypes.c_void_p),
                ("out_dt", ctypes.c_int), ("m", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64)]


def _bind(lib: ctypes.CDLL) -> None:
    P, I, I64, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    sigs = {
        "zq_abi_version": (I, []), "zq_has_sm90_gemm": (I, []), "zq_gemm_sm90_num_configs": (I, []),
        "zq_error_string": (ctypes.c_char_p, [I]),
        "zq_quantize_per_token": (I, [P, I, I64, I64, P, P, P]),
        "zq_quantize_per_tensor": (I, [P, I, I64, I64, P, P, P, P]),
        "zq_norm_quant": (I, [P, P, P, P, I, I64, I64, F, I, P, P, P, P, P]),
        "zq_act_quant": (I, [P, P, P, I, I64, I64, I, P, P, P, P]),
        "zq_gemm_simt": (I, [ctypes.POINTER(GemmArgs), P]),
        "zq_gemm_sm90_config": (I, [ctypes.POINTER(GemmArgs), I, P]),
        "zq_gemm_mma_config": (I, [ctypes.POINTER(GemmArgs), I, P]), "zq_gemm_mma_num_configs": (I, []),
        "zq_unpack_int4": (I, [P, I64, I64, P, P]),
        "zq_dequantize_weight": (I, [P, I, P, I64, I64, I64, P, I, P]),
        "zq_rope": (I, [P, P, P, P, P, P, I, I64, I64, I64, I64, I64, P, P, P]),
        "zq_decode_attention": (I, [P, I64, I64, P, P, P, I, I64, I64, I64, I64, I64, F, P, P]),
    }
    for name, (res, args) in sigs.items():
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


def _sm90_usable(device: torch.device) -> bool:
    return has_sm90_gemm() and torch.cuda.get_device_capability(device) == (9, 0)


def describe() -> str:
    return f"{_path} (Hopper INT8 GEMM: {'yes' if has_sm90_gemm() else 'no'})"


# ---- activation quantization -------------------------------------------------------------------------
@cuda_kernel("quantize_per_token")
def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    if x.dtype not in DTYPES or x.numel() == 0:
        return qm.quantize_per_token(x)
    x = x.contiguous()
    k = x.shape[-1]
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    s = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        _check(_lib.zq_quantize_per_token(x.data_ptr(), DTYPES[x.dtype], x.numel() // k, k, q.data_ptr(),
                                          s.data_ptr(), _stream(x)), "quantize_per_token")
    return q, s


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


@cuda_kernel("norm_quant")
def norm_quant(x, residual, weight, bias, eps, kind, emit_out, emit_sum):
    k = x.shape[-1]
    if x.numel() == 0:
        return _ref("norm_quant")(x, residual, weight, bias, eps, kind, emit_out, emit_sum)
    if not _same_dtype(x, residual, weight, bias) or k > 56 * 1024 or kind not in ("layer", "rms"):
        return _fallback("norm_quant", "mixed or fp64 dtypes, rows over 56K, or an unknown norm", x, residual, weight,
                         bias, eps, kind, emit_out, emit_sum)
    x = x.contiguous()
    residual = None if residual is None else residual.contiguous()
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    s = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    out = torch.empty_like(x) if emit_out else x.new_empty((0,))
    hsum = torch.empty_like(x) if emit_sum and residual is not None else x.new_empty((0,))
    with torch.cuda.device(x.device):
        _check(_lib.zq_norm_quant(x.data_ptr(), _ptr(residual), weight.contiguous().data_ptr(),
                                  _ptr(None if bias is None else bias.contiguous()), DTYPES[x.dtype],
                                  x.numel() // k, k, float(eps), int(kind == "rms"), q.data_ptr(), s.data_ptr(),
                                  _ptr(out), _ptr(hsum), _stream(x)), "norm_quant")
    return q, s, out, hsum


@cuda_kernel("act_quant")
def act_quant(x, bias, gate, act, emit_out):
    k = x.shape[-1]
    if x.numel() == 0:
        return _ref("act_quant")(x, bias, gate, act, emit_out)
    if not _same_dtype(x, bias, gate) or k > 56 * 1024:
        return _fallback("act_quant", "mixed or fp64 dtypes, or rows over 56K", x, bias, gate, act, emit_out)
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    s = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    out = torch.empty_like(x) if emit_out else x.new_empty((0,))
    with torch.cuda.device(x.device):
        _check(_lib.zq_act_quant(x.data_ptr(), _ptr(None if bias is None else bias.contiguous()),
                                 _ptr(None if gate is None else gate.contiguous()), DTYPES[x.dtype],
                                 x.numel() // k, k, qm.ACTIVATIONS.index(act), q.data_ptr(), s.data_ptr(),
                                 _ptr(out), _stream(x)), "act_quant")
    return q, s, out


# ---- GEMMs ---------------------------------------------------------------------------------------------
def _gemm_args(x, x_scale, wq, w_scale, bias, residual, act, w_bits, out, m, n, k) -> GemmArgs:
    return GemmArgs(x=x.data_ptr(), x_dt=DTYPES.get(x.dtype, 0), x_is_int8=int(x.dtype == torch.int8),
                    x_scale=_ptr(x_scale), wq=wq.data_ptr(), w_bits=w_bits, w_scale=w_scale.data_ptr(),
                    groups=w_scale.shape[1], bias=_ptr(bias), residual=_ptr(residual),
                    act=qm.ACTIVATIONS.index(act), out=out.data_ptr(), out_dt=DTYPES[out.dtype], m=m, n=n, k=k)


def _launch_gemm(path: str, xq, x_scale, wq, w_scale, bias, residual, act: str, w_bits: int, out: Tensor,
                 config: int) -> int:
    m, k = xq.shape
    a = _gemm_args(xq, x_scale, wq, w_scale, bias, residual, act, w_bits, out, m, wq.shape[0], k)
    with torch.cuda.device(xq.device):
        if path == "simt":
            return _lib.zq_gemm_simt(ctypes.byref(a), _stream(xq))
        if path == "mma":
            return _lib.zq_gemm_mma_config(ctypes.byref(a), config, _stream(xq))
        if path == "sm90":
            return _lib.zq_gemm_sm90_config(ctypes.byref(a), config, _stream(xq))
    raise ValueError(f"unknown GEMM path {path!r}; known: simt, mma, sm90")


def run_gemm(path: str, xq, x_scale, wq, w_scale, bias, residual, act: str, w_bits: int, out: Tensor,
             config: int = -1) -> None:
    """Launch one GEMM kernel on 2-D contiguous operands into `out` ("simt", "mma" or "sm90"; `config` picks the
    tile configuration of mma / sm90, -1 the default); benchmarks and tests use it."""
    _check(_launch_gemm(path, xq, x_scale, wq, w_scale, bias, residual, act, w_bits, out, config), f"gemm_{path}")


def _try_gemm_mma(xq, x_scale, wq, w_scale, bias, residual, act: str, w_bits: int, out: Tensor) -> bool:
    """Run the mma tensor-core GEMM; False (nothing launched) when the problem is outside its contract."""
    rc = _launch_gemm("mma", xq, x_scale, wq, w_scale, bias, residual, act, w_bits, out, -1)
    if rc == CUDA_ERROR_NOT_SUPPORTED:
        return False
    _check(rc, "gemm_mma")
    return True


def dequantize_weight(wq: Tensor, w_scale: Tensor, w_bits: int, dtype: torch.dtype) -> Tensor:
    n = wq.shape[0]
    k = wq.shape[1] * (2 if w_bits == 4 else 1)
    out = torch.empty((n, k), dtype=dtype, device=wq.device)
    with torch.cuda.device(wq.device):
        _check(_lib.zq_dequantize_weight(wq.data_ptr(), w_bits, w_scale.data_ptr(), w_scale.shape[1], n, k,
                                         out.data_ptr(), DTYPES[dtype], _stream(wq)), "dequantize_weight")
    return out


def unpack_int4(wq: Tensor) -> Tensor:
    n, k = wq.shape[0], wq.shape[1] * 2
    out = torch.empty((n, k), dtype=torch.int8, device=wq.device)
    with torch.cuda.device(wq.device):
        _check(_lib.zq_unpack_int4(wq.data_ptr(), n, k, out.data_ptr(), _stream(wq)), "unpack_int4")
    return out


def _epilogue_dtypes_ok(out_dtype, *ts) -> bool:
    return out_dtype in DTYPES and all(t is None or t.dtype == out_dtype for t in ts)


@cuda_kernel("int8_gemm_dequant")
def int8_gemm_dequant(xq, x_scale, wq, w_scale, bias, residual, act, w_bits, out_dtype):
    k, n = xq.shape[-1], wq.shape[0]
    m = xq.numel() // k if k else 0
    lead = xq.shape[:-1]
    if m == 0 or k == 0:
        return _ref("int8_gemm_dequant")(xq, x_scale, wq, w_scale, bias, residual, act, w_bits, out_dtype)
    if not _epilogue_dtypes_ok(out_dtype, bias, residual):
        gemm_paths["reference"] += 1
        return _fallback("int8_gemm_dequant", "bias / residual dtype differs from the output dtype", xq, x_scale, wq,
                         w_scale, bias, residual, act, w_bits, out_dtype)
    x2 = xq.reshape(m, k).contiguous()
    xs = x_scale.reshape(m).to(torch.float32).contiguous()
    ws = w_scale.to(torch.float32).contiguous()
    res2 = None if residual is None else residual.reshape(m, n).contiguous()
    bias = None if bias is None else bias.contiguous()
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    row_scales = ws.shape[1] == 1
    tensor_core_ok = (out_dtype != torch.float32 and k % 16 == 0 and n % 8 == 0 and _sm90_usable(xq.device))
    # The mma kernel (sm_80+) takes K-group scales and INT4 weights, and INT8 row scales where there is no
    # Hopper kernel (A100); it declines problems outside its contract (K % 32, N % 8, ...), which then go on.
    # On Hopper it also wins the decode-sized row-scaled GEMMs with short K, and loses to the Hopper kernel
    # (after a per-call INT4 unpack) or the fp16 dequant path at large M: see MMA_* above.
    if not row_scales:
        mma_first = SMALL_M_KGROUPS < m <= MMA_KGROUP_MAX_M or not tensor_core_ok and m > SMALL_M_KGROUPS
    elif not tensor_core_ok:
        mma_first = m > SMALL_M
    else:
        mma_first = SMALL_M < m <= MMA_ROW_MAX_M and (w_bits == 4 or k <= MMA_ROW_MAX_K)
    if mma_first and _try_gemm_mma(x2, xs, wq.contiguous(), ws, bias, res2, act, w_bits, out):
        gemm_paths["mma"] += 1
    elif m > SMALL_M and tensor_core_ok and row_scales:
        w8 = wq.contiguous() if w_bits == 8 else unpack_int4(wq.contiguous())
        gemm_paths["sm90"] += 1
        run_gemm("sm90", x2, xs, w8, ws, bias, res2, act, 8, out)
    elif m > SMALL_M_KGROUPS and tensor_core_ok:
        # K-group scales at large M that the mma kernel declines (group_k % 32 != 0, ...): the fp16
        # tensor cores (weights dequantized to the output dtype, activations dequantized per token); numerically
        # within fp16 rounding of the spec.
        gemm_paths["kgroup_fp16"] += 1
        wf = dequantize_weight(wq.contiguous(), ws, w_bits, out_dtype)
        y = torch.nn.functional.linear((x2.float() * xs[:, None]).to(out_dtype), wf).float()
        out = qm.epilogue(y, bias, act, res2, out_dtype)
    else:
        gemm_paths["simt"] += 1
        run_gemm("simt", x2, xs, wq.contiguous(), ws, bias, res2, act, w_bits, out)
    return out.reshape(*lead, n)


@cuda_kernel("weight_only_gemm")
def weight_only_gemm(x, wq, w_scale, bias, residual, act, w_bits):
    k, n = x.shape[-1], wq.shape[0]
    m = x.numel() // k if k else 0
    if m == 0:
        return _ref("weight_only_gemm")(x, wq, w_scale, bias, residual, act, w_bits)
    if not _epilogue_dtypes_ok(x.dtype, bias, residual):
        return _fallback("weight_only_gemm", "bias / residual dtype differs from x's", x, wq, w_scale, bias, residual,
                         act, w_bits)
    lead = x.shape[:-1]
    x2 = x.reshape(m, k).contiguous()
    ws = w_scale.to(torch.float32).contiguous()
    res2 = None if residual is None else residual.reshape(m, n).contiguous()
    bias = None if bias is None else bias.contiguous()
    if m <= SMALL_M_KGROUPS and x.dtype != torch.float32:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        run_gemm("simt", x2, None, wq.contiguous(), ws, bias, res2, act, w_bits, out)
    else:  # larger M: dequantize the weight once per call, fp16/bf16 tensor cores: dequantize the weight once, fp16/bf16 tensor cores
        wf = dequantize_weight(wq.contiguous(), ws, w_bits, x.dtype)
        out = qm.epilogue(torch.nn.functional.linear(x2, wf).float(), bias, act, res2, x.dtype)
    return out.reshape(*lead, n)


# ---- attention around the KV cache (generation graphs) ---------------------------------------------------
def _int64s(values) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


@cuda_kernel("rope")
def rope(q, k, cos, sin):
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    fits = (q.dtype in DTYPES and all(t.dtype == q.dtype and t.device == q.device for t in (k, cos, sin))
            and k.dim() == 4 and (k.shape[0], k.shape[2], k.shape[3]) == (b, s, d) and d % 2 == 0 and d <= 512
            and all(t.dim() == 4 and t.shape[1:] == (1, s, d) and t.shape[0] in (1, b) for t in (cos, sin))
            and q.numel() > 0)
    if not fits:
        attention_paths["rope_reference"] += 1
        if q.numel() == 0:
            return _ref("rope")(q, k, cos, sin)
        return _fallback("rope", "mixed dtypes, odd or > 512 head dim, or cos/sin not [B, 1, S, D]", q, k, cos, sin)
    cos3, sin3 = (t.expand(b, 1, s, d).reshape(b, s, d).contiguous() for t in (cos, sin))
    q_out = torch.empty((b, hq, s, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((b, hkv, s, d), dtype=q.dtype, device=q.device)
    with torch.cuda.device(q.device):
        _check(_lib.zq_rope(q.data_ptr(), _int64s(q.stride()), k.data_ptr(), _int64s(k.stride()), cos3.data_ptr(),
                            sin3.data_ptr(), DTYPES[q.dtype], b, hq, hkv, s, d, q_out.data_ptr(), k_out.data_ptr(),
                            _stream(q)), "rope")
    attention_paths["rope"] += 1
    return q_out, k_out


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
            rc = _lib.zq_decode_attention(q.data_ptr(), q_sb, q_sh, k.data_ptr(), v.data_ptr(), m.data_ptr(),
                                          DTYPES[q.dtype], b, hq, hkv, l, d, float(scale), out.data_ptr(),
                                          _stream(q))
        if rc != CUDA_ERROR_NOT_SUPPORTED:  # e.g. a cache slice that is not 16-byte aligned, L past shared memory
            _check(rc, "decode_attention")
            attention_paths["decode_attention"] += 1
            return out
    attention_paths["gqa_attention_reference"] += 1
    if s > 1 or b == 0:  # prefill: SDPA (the kernel is for one query token per row)
        return _ref("gqa_attention")(q, k, v, mask, scale)
    return _fallback("gqa_attention", "one-token attention outside the kernel's contract (dtype, head dim, mask "
                     "shape, alignment or a cache longer than shared memory)", q, k, v, mask, scale)


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
    for decl in registry.declared(namespace=None):
        if decl.cuda_kernel is not None:
            torch.library.register_kernel(decl.qualname, "cuda", decl.cuda_kernel)
