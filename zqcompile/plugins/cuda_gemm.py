"""The CUDA implementations of the zq GEMM ops: each call looks its problem up in the one chooser
(plugins/gemm_kernels.py, memoized per problem key: the same choice the compile plan records per M bucket) and
launches that kernel -- a C kernel through the library's dispatcher `zq_gemm_run` (the TensorRT plugin's too), or a
PyTorch path (the fp16 dequant path; torch._scaled_mm for FP8). A kernel that declines at run time (alignment, grid
limits) hands over to the plan's fallback; inputs only the reference takes (mixed dtypes) run it; both are counted
in `zqcompile.plugins.cuda.fallbacks` and warned about once. `served` counts which kernel served each call
(`served_by()` for a block of calls).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections import Counter
from typing import Iterator, Optional

import torch
from torch import Tensor

from zqcompile.ops import quant_math as qm
from zqcompile.ops.registry import cuda_kernel
from zqcompile.plugins import cuda as lib
from zqcompile.plugins.gemm_kernels import BY_NAME, GemmChoice, GemmDevice, choose_gemm, problem_of

CUDA_ERROR_NOT_SUPPORTED = 801  # cudaErrorNotSupported: the kernel declined the problem, nothing was launched
served: Counter = Counter()  # kernel name -> calls it served, this process (benchmarks; tests use served_by)
_active: list[Counter] = []


@contextlib.contextmanager
def served_by() -> Iterator[Counter]:
    """`with served_by() as s: ...` -> s counts the kernel that served each GEMM call of the block (calls made
    while a CUDA graph is captured count once, at capture; replays do not call Python)."""
    c: Counter = Counter()
    _active.append(c)
    try:
        yield c
    finally:
        _active.remove(c)


def _served(name: str) -> None:
    served[name] += 1
    for c in _active:
        c[name] += 1


@functools.lru_cache(maxsize=64)
def device_of(index: int) -> GemmDevice:
    """The GemmDevice of CUDA device `index` (the library is loaded: its kernels are what called us)."""
    return GemmDevice(f"cuda:{index} {torch.cuda.get_device_name(index)}", torch.cuda.get_device_capability(index),
                      library=lib._lib is not None, sm90_library=lib._lib is not None and lib.has_sm90_gemm())


def sm90_usable(device: torch.device | str | int = 0) -> bool:
    """The Hopper GEMM is in the library and the device is an sm_90 (benchmarks, tests)."""
    index = device if isinstance(device, int) else torch.device(device).index
    d = device_of(torch.cuda.current_device() if index is None else index)
    return d.sm90_library and d.capability == (9, 0)


class GemmArgs(ctypes.Structure):
    """zq_gemm_args of plugins_cuda/include/zq/gemm.h."""
    _fields_ = [("x", ctypes.c_void_p), ("x_dt", ctypes.c_int), ("x_is_int8", ctypes.c_int),
                ("x_scale", ctypes.c_void_p), ("wq", ctypes.c_void_p), ("w_bits", ctypes.c_int),
                ("w_fp8", ctypes.c_int), ("w_scale", ctypes.c_void_p), ("groups", ctypes.c_int64),
                ("bias", ctypes.c_void_p), ("residual", ctypes.c_void_p), ("act", ctypes.c_int),
                ("out", ctypes.c_void_p), ("out_dt", ctypes.c_int), ("m", ctypes.c_int64), ("n", ctypes.c_int64),
                ("k", ctypes.c_int64)]


def _args(x, x_scale, wq, w_scale, bias, residual, act, w_bits, out) -> GemmArgs:
    m, k = x.shape
    x_dt = lib.FP8_E4M3 if qm.is_fp8(x) else lib.DTYPES.get(x.dtype, 0)
    return GemmArgs(x=x.data_ptr(), x_dt=x_dt, x_is_int8=int(x.dtype == torch.int8), x_scale=lib._ptr(x_scale),
                    wq=wq.data_ptr(), w_bits=w_bits, w_fp8=int(qm.is_fp8(wq)), w_scale=w_scale.data_ptr(),
                    groups=w_scale.shape[1], bias=lib._ptr(bias), residual=lib._ptr(residual),
                    act=qm.ACTIVATIONS.index(act), out=out.data_ptr(), out_dt=lib.DTYPES[out.dtype], m=m,
                    n=wq.shape[0], k=k)


# Benchmarks' A/B knob: the skinny kernel's configuration for every call the library would pick one for (env
# ZQ_SKINNY_CONFIG at import; -1: the library's pick_config). Where that configuration declines a problem, the
# library's pick runs instead.
skinny_config = int(os.environ.get("ZQ_SKINNY_CONFIG", "-1"))


def launch_gemm(path: str, x, x_scale, wq, w_scale, bias, residual, act: str, w_bits: int, out: Tensor,
                config: int = -1) -> int:
    """Launch C kernel `path` ("simt", "mma", "sm90", "skinny", "sm90_fp8", "wgmma") on 2-D contiguous operands into
    `out`; the cudaError_t. config -1: through zq_gemm_run (INT4 weights unpacked into a workspace for sm90); >= 0:
    that tile configuration of mma / sm90 / skinny / sm90_fp8 / wgmma (benchmarks, tests)."""
    kernel = BY_NAME[path]
    if kernel.c_id is None:
        raise ValueError(f"{path!r} is not a kernel of the C library; those are simt, mma, sm90, skinny, sm90_fp8, "
                         f"wgmma")
    a = _args(x, x_scale, wq, w_scale, bias, residual, act, w_bits, out)
    with torch.cuda.device(x.device):
        stream = lib._stream(x)
        if config >= 0 and path != "simt":
            return getattr(lib._lib, f"zq_gemm_{path}_config")(ctypes.byref(a), config, stream)
        ws_bytes = lib._lib.zq_gemm_workspace_bytes(kernel.c_id, a.n, a.k, w_bits)
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device=x.device) if ws_bytes else None
        return lib._lib.zq_gemm_run(kernel.c_id, ctypes.byref(a), lib._ptr(ws), ws_bytes, stream)


def run_gemm(path: str, x, x_scale, wq, w_scale, bias, residual, act: str, w_bits: int, out: Tensor,
             config: int = -1) -> None:
    """launch_gemm, raising on any error (cudaErrorNotSupported included); benchmarks and tests use it."""
    lib._check(launch_gemm(path, x, x_scale, wq, w_scale, bias, residual, act, w_bits, out, config), f"gemm_{path}")


def dequantize_weight(wq: Tensor, w_scale: Tensor, w_bits: int, dtype: torch.dtype) -> Tensor:
    n = wq.shape[0]
    k = wq.shape[1] * (2 if w_bits == 4 else 1)
    out = torch.empty((n, k), dtype=dtype, device=wq.device)
    with torch.cuda.device(wq.device):
        lib._check(lib._lib.zq_dequantize_weight(wq.data_ptr(), w_bits, w_scale.data_ptr(), w_scale.shape[1], n, k,
                                                 out.data_ptr(), lib.DTYPES[dtype], lib._stream(wq)),
                   "dequantize_weight")
    return out


def unpack_int4_two_level(wq: Tensor, w_scale: Tensor) -> tuple[Tensor, Tensor]:
    """INT4 [N, K/2] with two-level K-group scales [N, G] -> (int8 code x u [N, K], the row base [N, 1] fp32):
    the operands of the INT8 GEMM with row scales that computes the same products (zq_unpack_int4_two_level)."""
    n, k = wq.shape[0], wq.shape[1] * 2
    w8 = torch.empty((n, k), dtype=torch.int8, device=wq.device)
    base = torch.empty((n, 1), dtype=torch.float32, device=wq.device)
    with torch.cuda.device(wq.device):
        lib._check(lib._lib.zq_unpack_int4_two_level(wq.data_ptr(), w_scale.data_ptr(), w_scale.shape[1], n, k,
                                                     w8.data_ptr(), base.data_ptr(), lib._stream(wq)),
                   "unpack_int4_two_level")
    return w8, base


def _fp16_dequant(x, x_scale, wq, w_scale, bias, residual, act, w_bits, out_dtype) -> Tensor:
    """The weight dequantized to the output dtype per call, the activations dequantized per token (A8), then
    cuBLAS; numerically within fp16 rounding of the spec."""
    wf = dequantize_weight(wq, w_scale, w_bits, out_dtype)
    xf = x if x_scale is None else (x.float() * x_scale[:, None]).to(out_dtype)
    return qm.epilogue(torch.nn.functional.linear(xf, wf).float(), bias, act, residual, out_dtype)


def _scaled_mm(x, x_scale, wq, w_scale, bias, residual, act, out_dtype) -> Tensor:
    """torch._scaled_mm with row-wise scales (x_scale as [M, 1], w_scale as [1, N], fp32; bf16 out: the row-wise
    path's output type), then the epilogue in fp32 in PyTorch."""
    m, n = x.shape[0], wq.shape[0]
    acc = torch._scaled_mm(x, wq.t(), scale_a=x_scale.reshape(m, 1), scale_b=w_scale.reshape(1, n),
                           out_dtype=torch.bfloat16, use_fast_accum=False)
    return qm.epilogue(acc.float(), bias, act, residual, out_dtype)


def _run(op: str, choice: GemmChoice, x, x_scale, wq, w_scale, bias, residual, act, w_bits, out_dtype) -> Tensor:
    """Run the chosen kernel on 2-D contiguous operands; its fallback if it declines at run time."""
    kernel = choice.kernel
    if kernel.name == "fp16_dequant":
        _served(kernel.name)
        return _fp16_dequant(x, x_scale, wq, w_scale, bias, residual, act, w_bits, out_dtype)
    if kernel.name == "scaled_mm":
        _served(kernel.name)
        return _scaled_mm(x, x_scale, wq, w_scale, bias, residual, act, out_dtype)
    out = torch.empty((x.shape[0], wq.shape[0]), dtype=out_dtype, device=x.device)
    if kernel.name == "sm90_two_level":  # the INT8 GEMM on code x u with the row base (its workspace: this call's)
        w8, base = unpack_int4_two_level(wq, w_scale)
        rc = launch_gemm("sm90", x, x_scale, w8, base, bias, residual, act, 8, out)
        del w8
    else:
        rc = CUDA_ERROR_NOT_SUPPORTED
        if kernel.name == "skinny" and skinny_config >= 0:
            rc = launch_gemm(kernel.name, x, x_scale, wq, w_scale, bias, residual, act, w_bits, out, skinny_config)
        if rc == CUDA_ERROR_NOT_SUPPORTED:
            rc = launch_gemm(kernel.name, x, x_scale, wq, w_scale, bias, residual, act, w_bits, out)
    if rc == CUDA_ERROR_NOT_SUPPORTED and choice.fallback is not None:
        lib.note_fallback(op, f"{kernel.name} declined at run time (pointer alignment or grid size); ran "
                              f"{choice.fallback.name}, the plan's fallback")
        return _run(op, GemmChoice(choice.fallback, None, (), choice.device), x, x_scale, wq, w_scale, bias,
                    residual, act, w_bits, out_dtype)
    lib._check(rc, f"gemm_{kernel.name}")
    _served(kernel.name)
    return out


def _gemm(op: str, x, x_scale, wq, w_scale, bias, residual, act: str, w_bits: int, out_dtype, ref_args: tuple,
          two_level: bool = False):
    k, n = x.shape[-1], wq.shape[0]
    m = x.numel() // k if k else 0
    if m == 0 or k == 0:
        return lib._ref(op)(*ref_args)
    choice = choose_gemm(problem_of(op, x, wq, w_scale, bias, residual, w_bits, out_dtype, m, two_level),
                         device_of(x.device.index))
    if choice.kernel.name == "reference":
        _served("reference")
        last = "scaled_mm" if op == "fp8_gemm_dequant" else "simt"  # the kernel that takes the most of op's problems
        return lib._fallback(op, choice.reason(last) or "no kernel takes it", *ref_args)
    y = _run(op, choice, x.reshape(m, k).contiguous(),
             None if x_scale is None else x_scale.reshape(m).to(torch.float32).contiguous(), wq.contiguous(),
             w_scale.to(torch.float32).contiguous(), None if bias is None else bias.contiguous(),
             None if residual is None else residual.reshape(m, n).contiguous(), act, w_bits, out_dtype)
    return y.reshape(*x.shape[:-1], n)


@cuda_kernel("int8_gemm_dequant")
def int8_gemm_dequant(xq, x_scale, wq, w_scale, bias, residual, act, w_bits, out_dtype, two_level=False):
    return _gemm("int8_gemm_dequant", xq, x_scale, wq, w_scale, bias, residual, act, w_bits, out_dtype,
                 (xq, x_scale, wq, w_scale, bias, residual, act, w_bits, out_dtype), two_level)


@cuda_kernel("weight_only_gemm")
def weight_only_gemm(x, wq, w_scale, bias, residual, act, w_bits):
    return _gemm("weight_only_gemm", x, None, wq, w_scale, bias, residual, act, w_bits, x.dtype,
                 (x, wq, w_scale, bias, residual, act, w_bits))


@cuda_kernel("fp8_gemm_dequant")
def fp8_gemm_dequant(xq, x_scale, wq, w_scale, bias, residual, act, out_dtype):
    """The Hopper FP8 kernel with the epilogue fused (sm90_fp8, where the plan chooses it), or torch._scaled_mm with
    the epilogue in PyTorch; the reference where the plan says so."""
    return _gemm("fp8_gemm_dequant", xq, x_scale, wq, w_scale, bias, residual, act, 8, out_dtype,
                 (xq, x_scale, wq, w_scale, bias, residual, act, out_dtype))


def chosen(op: str, x, wq, w_scale, bias=None, residual=None, w_bits: int = 8, out_dtype=None,
           device: Optional[GemmDevice] = None, two_level: bool = False) -> GemmChoice:
    """The choice a call with these operands gets (tests, benchmarks)."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    m = x.numel() // x.shape[-1]
    return choose_gemm(problem_of(op, x, wq, w_scale, bias, residual, w_bits, out_dtype, m, two_level),
                       device or device_of(x.device.index))
