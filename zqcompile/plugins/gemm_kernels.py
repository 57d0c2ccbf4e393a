"""The GEMM kernels of the zq runtime as objects, and the one chooser among them (after vLLM's scaled-mm kernel
selection). Each kernel says whether it can implement a problem on a device: None, or the reason it declines --
its contract first (what the kernel computes at all: dtypes, K % 32, group sizes, the device), then the measured
policy (the M range where another kernel is faster, bench/results, H200). KERNELS lists them in priority order;
`choose_gemm` takes the first that accepts, memoized per problem key, and names the next accepting one as the
fallback for the declines that cannot be known up front (pointer alignment, grid limits).

The choice is made here once and used everywhere: the CUDA wrappers (plugins/cuda_gemm.py) launch the chosen
kernel, the compile plan records it per GEMM and M bucket (plugins/gemm_plan.py, shown by report()), and the
TensorRT plugins get it as their `kernel_plan` field (`plan_text`). Pure Python: no torch, no CUDA library.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass, replace
from typing import Optional

# Tokens at or under which the CUDA-core GEMM beats the tensor-core paths (bench/results, H200): for INT8
# weights with row scales the sm90 kernel's ~5 us floor wins from M = 5; with K-group scales the alternative
# was the fp16 path that dequantizes the weight per call, so the CUDA-core kernel keeps M <= 16 (not yet
# re-measured against the mma kernel that now takes K groups: bench/bench_gemm.py).
SMALL_M = 4
SMALL_M_KGROUPS = 16
# Where the mma tensor-core kernel beats the alternatives on Hopper (bench/results/gemm_NVIDIA_H200.md and
# profile_decode_H200.md, H200): row-scaled INT8 at M <= 64 with K <= 1024 (4.2-4.4 us vs 5.0 for the Hopper
# kernel on SmolLM2's decode GEMMs); INT4 row-scaled at M <= 64 (the Hopper kernel needs a per-call unpack,
# which only pays off for larger M); INT4 K-groups (group 128) up to M = 1024, and at every M for N <= 1024
# (bench/results/gemm_w4_crossover_NVIDIA_H200.json, BERT / Llama-3.2-1B / Llama-3-8B MLP shapes: fp16-dequant
# time / mma time 1.2-2.5 at M = 256-512, 0.97-1.13 at M = 1024, 0.68-1.04 at 2048 and 0.44-0.87 at 8192 for
# N >= 2048; for N = 768 / 1024 the mma kernel stays ahead, 0.95-1.06 at M = 2048, 1.19-1.47 at 4096-8192).
MMA_ROW_MAX_M = 64
MMA_ROW_MAX_K = 1024
MMA_KGROUP_MAX_M = 1024
MMA_KGROUP_ANY_M_MAX_N = 1024
MMA_MAX_GROUP_K = 65536  # the int32 sum of a group of K terms stays exact (gemm_mma.cu kMaxGroupK)
# The decode-shaped kernel (gemm_skinny.cu): its contract's bounds, then where it is taken, measured with every kernel
# forced on the decode GEMMs of the Llama-3-8B / 3.2-1B layers (bench/results/gemm_decode_NVIDIA_H200.md: `python
# bench/bench_gemm.py --decode`, H200, L2 defeated). INT4 with K groups of 128: the fastest kernel at every M <= 64 on
# every shape but two rows (M = 16: 4.0-31.6 us where mma took 14.5-142 and simt 19-148; the misses: N = 16384 at
# M = 64, 37.8 vs mma's 28.7, and 8192 x 2048 at M = 1, 2 % behind simt). INT8 with row scales: the fastest, or within 6 %, at M <= 16 on every shape (M = 1: 3.8-35.4
# us vs simt's 4.0-33.5; M = 16: 4.1-40.8 vs sm90's 7.6-38.5); at M = 17-32 the fastest where N <= 4096 (the sm90
# kernel ahead at N = 6144 / 16384 / 28672), at M = 33-64 only where N <= 2048.
SKINNY_MAX_M = 64
SKINNY_CHUNK_K = 128
SKINNY_MAX_ROW_K = 65536
SKINNY_INT8_MID_M = 32  # a bucket edge: INT8 row scales at M 17-32 / 33-64 have different N limits
SKINNY_INT8_MAX_N = ((16, math.inf), (SKINNY_INT8_MID_M, 4096), (SKINNY_MAX_M, 2048))  # (max M, max N)
# "auto": the measured policy above; "1": wherever its contract holds; "0": never (A/B measurements). Read from
# ZQ_GEMM_SKINNY at import; `skinny_mode(...)` changes it for a block.
SKINNY_MODES = ("auto", "0", "1")


def _check_policy_mode(mode: str, where: str, kernel: str) -> str:
    """A kernel's policy switch (auto / 0 / 1), or ValueError naming `where` and the values it takes."""
    if mode not in SKINNY_MODES:  # the same three for every kernel's switch
        raise ValueError(f"{where} must be one of auto, 0, 1 ({kernel}: measured policy, never, wherever it can), "
                         f"got {mode!r}")
    return mode


def _check_skinny_mode(mode: str, where: str) -> str:
    return _check_policy_mode(mode, where, "the decode-shaped GEMM kernel")


SKINNY_MODE = _check_skinny_mode(os.environ.get("ZQ_GEMM_SKINNY", "auto"), "ZQ_GEMM_SKINNY")
# The Hopper FP8 kernel with the fused epilogue (sm90_fp8) is the FP8 GEMM wherever it can run (ZQ_GEMM_SM90_FP8=1,
# the default; 0 turns it off, read at import; `sm90_fp8_mode(...)` changes it for a block). On the H200 it beat
# torch._scaled_mm + the PyTorch epilogue on every shape timed, 1.21-3.82x (bench/bench_fp8_gemm.py), and in the
# fp8 engines: BERT-base s128 b128 15.21 -> 5.93 ms, b1 1.18 -> 0.73, Llama-3-8B prefill 2048 55.50 -> 47.17
# (`bash scripts/gpu_issue14.sh fp8-engines`, bench/results/prefill_fp8_gate{0,1}_H200.json).
SM90_FP8_MODES = ("0", "1")


def _check_sm90_fp8_mode(mode: str, where: str) -> str:
    if mode not in SM90_FP8_MODES:
        raise ValueError(f"{where} must be 0 or 1 (the Hopper FP8 GEMM kernel: off, on where it can), got {mode!r}")
    return mode


SM90_FP8_MODE = _check_sm90_fp8_mode(os.environ.get("ZQ_GEMM_SM90_FP8", "1"), "ZQ_GEMM_SM90_FP8")

# The Hopper K-group kernel (gemm_wgmma.cu: wgmma with INT4 unpacked in shared memory, the same bits as mma): its
# contract's bounds, then where it is taken, measured with each kernel forced on the BERT / Llama MLP shapes at
# M = 256-16384 (bench/results/gemm_wgmma_NVIDIA_H200.md: `python bench/bench_gemm.py --wgmma`, H200, INT4 K groups
# of 128): 1.5-2.7x the mma kernel at M >= 512 on every shape (0.8x at M = 256 on the short-N long-K BERT fc2 /
# 1B down shapes, within the 65-1024 bucket). Against the fp16-dequant path the GEMM table has it ahead up to
# M = 2048 and, above 4096, 1.1-1.3x behind where N > K; but that column times the dequantized matmul alone, and
# end to end the path's PyTorch x dequantization and epilogue cost more: BERT-base s128 b128 W4/8A8 8.82 ms with
# this kernel on every MLP GEMM, 12.70 with fc1 (N > K) on the fp16-dequant path (bench/results/
# e2e_bert_b128_wgmma_*_H200.json). So it takes every K-group GEMM past M = 64. "auto": that policy; "1": wherever
# its contract holds; "0": never. Read from ZQ_GEMM_WGMMA at import; `wgmma_mode(...)` changes it for a block.
WGMMA_K = 128  # its k per stage, and the K-group sizes it takes are multiples of it
WGMMA_N = 128  # weight rows a block
WGMMA_MIN_M = 64  # at or under: the decode-shaped kernel's range
WGMMA_MODES = SKINNY_MODES


def _check_wgmma_mode(mode: str, where: str) -> str:
    return _check_policy_mode(mode, where, "the Hopper K-group GEMM kernel")


WGMMA_MODE = _check_wgmma_mode(os.environ.get("ZQ_GEMM_WGMMA", "auto"), "ZQ_GEMM_WGMMA")

# Two-level INT4 K-group scales (WeightQuant(group_scales="two-level"): each u x a row base, u in 1..15): past
# M = 64 the weight is unpacked per call to int8 code x u (|code x u| <= 105, zq_unpack_int4_two_level) and the
# Hopper INT8 GEMM runs it with the base as its row scale, the INT8 tensor-core speed for W4A8 prefill at the cost
# of an N x K int8 workspace per call. "auto": past M = 64 on sm_90 (past 128 where N > K); "1": wherever its
# contract holds; "0": never. Read from ZQ_GEMM_TWO_LEVEL at import; `two_level_mode(...)` changes it for a block.
TWO_LEVEL_MODES = SKINNY_MODES
TWO_LEVEL_MIN_M = WGMMA_MIN_M  # at or under: the decode-shaped and mma kernels (which read the fp32 scales)
# N > K (BERT fc1, gate+up): at M = 128 the per-call unpack (N x K bytes written) costs more than the K-group
# kernel's whole GEMM (4096 x 14336: 63.3 us vs wgmma 46.2; 0.45-0.92x of it from M = 512 on every shape;
# bench/results/gemm_two_level_NVIDIA_H200.md, stop 36). M = 129-511 is not measured.
TWO_LEVEL_MIN_M_WIDE = 128


def _check_two_level_mode(mode: str, where: str) -> str:
    return _check_policy_mode(mode, where, "the two-level INT4 path (unpack, then the Hopper INT8 GEMM)")


TWO_LEVEL_MODE = _check_two_level_mode(os.environ.get("ZQ_GEMM_TWO_LEVEL", "auto"), "ZQ_GEMM_TWO_LEVEL")

# Every threshold above is a bucket edge, so each M bucket has one choice: 1-4, 5-16, 17-32, 33-64, 65-128,
# 129-1024, >1024 (at most ZQ_GEMM_PLAN_MAX = 8: the TensorRT plugin's plan).
_M_EDGES = sorted({SMALL_M, SMALL_M_KGROUPS, SKINNY_INT8_MID_M, MMA_ROW_MAX_M, MMA_KGROUP_MAX_M, TWO_LEVEL_MIN_M_WIDE})
M_BUCKETS: tuple[tuple[int, float], ...] = tuple(zip((1, *(e + 1 for e in _M_EDGES)), (*_M_EDGES, math.inf)))
HALF = ("float16", "bfloat16")
FP8_TENSORRT = "the TensorRT dialect exports FP8 GEMMs as standard ONNX (no zq plugin takes FP8)"
FLOATS = ("float32", *HALF)


def bucket_index(m: int) -> int:
    return next(i for i, (_, hi) in enumerate(M_BUCKETS) if m <= hi)


def bucket_name(i: int) -> str:
    lo, hi = M_BUCKETS[i]
    return f">{lo - 1}" if hi == math.inf else f"{lo}-{int(hi)}"


def dtype_name(dtype) -> Optional[str]:
    """'float16' for torch.float16 (or its name); None stays None."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class GemmProblem:
    """One GEMM as the kernels see it. `m` is the token count, or any M of the bucket being planned."""
    op: str  # "int8_gemm_dequant" (A8: int8 x) | "fp8_gemm_dequant" (FP8 x and W) | "weight_only_gemm" (A16)
    n: int
    k: int
    w_bits: int  # 8 | 4 (packed two per byte along K)
    group_k: int  # 0: one scale per weight row; else the K-group size
    x_dtype: str  # "int8" or the float dtype of x
    out_dtype: str
    bias_dtype: Optional[str] = None
    residual_dtype: Optional[str] = None
    m: int = 1
    two_level: bool = False  # INT4 K-group scales that are u x a row base (int8_gemm_dequant's two_level)

    @property
    def row_scales(self) -> bool:
        return self.group_k == 0

    def key(self) -> "GemmProblem":
        """The problem with M replaced by its bucket's first M: every M of a bucket gets the same kernel."""
        return replace(self, m=M_BUCKETS[bucket_index(self.m)][0])

    def describe(self) -> str:
        if self.op == "fp8_gemm_dequant":
            return f"W FP8 A FP8 M={self.m} N={self.n} K={self.k}, row scales, out {self.out_dtype}"
        a = "A8" if self.x_dtype == "int8" else f"A16 ({self.x_dtype})"
        scales = "row scales" if self.row_scales else f"K groups of {self.group_k}"
        scales += ", two-level" if self.two_level else ""
        return f"W{self.w_bits}{a} M={self.m} N={self.n} K={self.k}, {scales}, out {self.out_dtype}"


def problem_of(op: str, x, wq, w_scale, bias, residual, w_bits: int, out_dtype, m: int = 1,
               two_level: bool = False) -> GemmProblem:
    """The problem of a zq GEMM call from its operands (tensors, or the fake tensors of a graph node)."""
    k, groups = int(x.shape[-1]), int(w_scale.shape[1])
    two_level = bool(two_level) and groups > 1 and int(w_bits) == 4  # the flag means nothing for other weights
    return GemmProblem(op, int(wq.shape[0]), k, int(w_bits), 0 if groups == 1 else k // groups, dtype_name(x.dtype),
                       dtype_name(out_dtype), dtype_name(getattr(bias, "dtype", None)),
                       dtype_name(getattr(residual, "dtype", None)), m, two_level)


@dataclass(frozen=True)
class GemmDevice:
    """Where the GEMM runs, as far as the choice needs to know."""
    name: str  # "cpu", "cuda:0 NVIDIA H200", ...
    capability: Optional[tuple[int, int]] = None  # None: not a CUDA device
    library: bool = False  # libzq_kernels.so is loaded
    sm90_library: bool = False  # ... and was built with the Hopper GEMM
    tensorrt: bool = False  # inside the TensorRT plugin: the C library's kernels only

    def describe(self) -> str:
        if self.capability is None:
            return self.name
        lib = ("kernel library with the Hopper GEMM" if self.sm90_library else "kernel library without the Hopper "
               "GEMM") if self.library else "no kernel library"
        return f"{self.name} (sm_{self.capability[0]}{self.capability[1]}, {lib}{', TensorRT' if self.tensorrt else ''})"


CPU = GemmDevice("cpu")


def _device_reason(d: GemmDevice) -> Optional[str]:
    if d.capability is None:
        return "not a CUDA device"
    return None if d.library else "libzq_kernels.so is not loaded"


def _epilogue_reason(p: GemmProblem) -> Optional[str]:
    if p.out_dtype not in FLOATS or any(t not in (None, p.out_dtype) for t in (p.bias_dtype, p.residual_dtype)):
        return ("bias / residual dtype differs from the output dtype" if p.op != "weight_only_gemm" else
                "bias / residual dtype differs from x's") if p.out_dtype in FLOATS else f"{p.out_dtype} output"
    return None


def _int_weights(p: GemmProblem) -> Optional[str]:
    """The C library's kernels read INT8 / INT4 weights; an FP8 GEMM is scaled_mm's or the reference's."""
    return "FP8 x FP8: the library's kernels read INT8 / INT4 weights" if p.op == "fp8_gemm_dequant" else None


def _int8_x_half_out(p: GemmProblem) -> Optional[str]:
    """The tensor-core kernels multiply int8 x and write fp16 / bf16."""
    if p.op == "fp8_gemm_dequant":
        return _int_weights(p)
    if p.x_dtype != "int8":
        return "float activations (A16): it multiplies int8 x"
    if p.out_dtype not in HALF:
        return "float32 output: its epilogue writes fp16 / bf16"
    return None


def _sm80_int8_reason(p: GemmProblem, d: GemmDevice) -> Optional[str]:
    """What the sm80+ mma.sync kernels (mma, skinny) need of the device and the operands, shape rules apart."""
    why = _device_reason(d) or _epilogue_reason(p)
    if why:
        return why
    if d.capability < (8, 0):
        return "needs compute capability 8.0 or later"
    return _int8_x_half_out(p)


def _hopper_tensor_cores(p: GemmProblem, d: GemmDevice) -> bool:
    """Where the large-M paths were measured (and tuned): the Hopper kernel's shape rules on an sm_90 device."""
    return p.out_dtype != "float32" and p.k % 16 == 0 and p.n % 8 == 0 and d.sm90_library and d.capability == (9, 0)


class GemmKernel:
    name: str
    c_id: Optional[int] = None  # zq_gemm_kernel id in plugins_cuda/include/zq/gemm.h; None: not in the C library
    may_decline_at_run_time = False  # what the fallback is for
    summary: str

    def can_implement(self, p: GemmProblem, d: GemmDevice) -> Optional[str]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<GEMM kernel {self.name}>"


class Mma(GemmKernel):
    name, c_id, may_decline_at_run_time = "mma", 1, True  # x / wq 16-byte aligned, M under its grid limit
    summary = "sm80+ tensor cores (mma.sync), INT8 or INT4 unpacked in the mainloop, row or K-group scales"

    def can_implement(self, p, d):
        why = _sm80_int8_reason(p, d)
        if why:
            return why
        if p.k % 32 or p.n % 8:
            return "needs K % 32 == 0 and N % 8 == 0"
        if p.group_k and (p.k % p.group_k or p.group_k % 32):
            return "needs a K-group size that divides K and is a multiple of 32"
        if (p.group_k or p.k) > MMA_MAX_GROUP_K:
            return f"K (or its K-group size) over {MMA_MAX_GROUP_K}: the int32 group sum could overflow"
        small = SMALL_M if p.row_scales else SMALL_M_KGROUPS
        if p.m <= small:
            return f"policy: M <= {small}: the CUDA-core kernel is faster"
        if p.row_scales and _hopper_tensor_cores(p, d):
            if p.m > MMA_ROW_MAX_M:
                return f"policy: M > {MMA_ROW_MAX_M} with row scales: the Hopper kernel is faster"
            if p.w_bits == 8 and p.k > MMA_ROW_MAX_K:
                return f"policy: INT8 with K > {MMA_ROW_MAX_K}: the Hopper kernel is faster"
        if (not p.row_scales and p.m > MMA_KGROUP_MAX_M and p.n > MMA_KGROUP_ANY_M_MAX_N
                and FP16_DEQUANT.can_implement(p, d) is None):
            return (f"policy: M > {MMA_KGROUP_MAX_M} with K groups and N > {MMA_KGROUP_ANY_M_MAX_N}: the fp16 "
                    f"dequant path is faster")
        return None


class Wgmma(GemmKernel):
    name, c_id, may_decline_at_run_time = "wgmma", 5, True  # x / wq 16-byte aligned, M under its grid limit
    summary = ("Hopper wgmma (both operands in shared memory, INT4 unpacked there), INT8 or INT4 with K-group "
               "scales folded per group: large M")

    def can_implement(self, p, d):
        why = _sm80_int8_reason(p, d)
        if why:
            return why
        if d.capability != (9, 0):
            return "needs compute capability 9.0 (sm_90a code)"
        if p.k % WGMMA_K or p.n % WGMMA_N:
            return f"needs K % {WGMMA_K} == 0 and N % {WGMMA_N} == 0"
        if p.group_k and p.group_k % WGMMA_K:
            return f"needs a K-group size that is a multiple of {WGMMA_K}"
        if (p.group_k or p.k) > MMA_MAX_GROUP_K:
            return f"K (or its K-group size) over {MMA_MAX_GROUP_K}: the int32 group sum could overflow"
        if WGMMA_MODE == "0":
            return "policy: turned off (ZQ_GEMM_WGMMA=0)"
        if WGMMA_MODE == "auto":
            if p.row_scales:
                return ("policy: row scales: the Hopper CUTLASS kernel's (INT4 unpacked per call; not timed against "
                        "this one)")
            if p.m <= WGMMA_MIN_M:
                return f"policy: M <= {WGMMA_MIN_M}: the decode-shaped and mma kernels' range"
        return None


class Sm90TwoLevel(GemmKernel):
    name, may_decline_at_run_time = "sm90_two_level", True  # the Hopper kernel's limits (M past 2^31)
    summary = ("INT4 with two-level K-group scales unpacked per call to int8 code x u, then the CUTLASS Hopper INT8 "
               "GEMM with the row base as its scale (a workspace of N x K bytes; not in the C dispatcher)")

    def can_implement(self, p, d):
        why = _int_weights(p) or _device_reason(d)
        if why:
            return why
        if d.tensorrt:
            return "not in the C kernel library's dispatcher (an unpack, then the sm90 kernel): TensorRT cannot run it"
        why = SM90.can_implement(replace(p, w_bits=8, group_k=0, two_level=False, m=max(p.m, SMALL_M + 1)), d)
        if why:  # the INT8 row-scaled GEMM it runs: its contract (M past its policy edge)
            return why
        if not p.two_level:
            return "needs two-level INT4 K-group scales (WeightQuant(group_scales='two-level'))"
        if p.group_k % 16:
            return "needs a K-group size that is a multiple of 16"
        if TWO_LEVEL_MODE == "0":
            return "policy: turned off (ZQ_GEMM_TWO_LEVEL=0)"
        if TWO_LEVEL_MODE == "auto" and p.m <= TWO_LEVEL_MIN_M:
            return f"policy: M <= {TWO_LEVEL_MIN_M}: the decode-shaped and mma kernels read the weight once"
        if TWO_LEVEL_MODE == "auto" and p.n > p.k and p.m <= TWO_LEVEL_MIN_M_WIDE:
            return (f"policy: N > K and M <= {TWO_LEVEL_MIN_M_WIDE}: the per-call unpack costs more than the "
                    f"K-group kernel (measured)")
        return None


class Skinny(GemmKernel):
    name, c_id, may_decline_at_run_time = "skinny", 3, True  # x / wq 16-byte aligned
    summary = ("decode-shaped tensor cores (swap-AB mma.sync, the weight streamed into the fragments, split-K "
               "over 8 warps), INT8 or INT4, row or K-group scales, or FP8 E4M3 x E4M3 (sm_90), M <= 64")

    def can_implement(self, p, d):
        why = self._fp8_reason(p, d) if p.op == "fp8_gemm_dequant" else _sm80_int8_reason(p, d)
        if why:
            return why
        if p.m > SKINNY_MAX_M:
            return f"M > {SKINNY_MAX_M}: it is the decode-shaped kernel"
        if p.k % SKINNY_CHUNK_K or p.n % 16:
            return f"needs K % {SKINNY_CHUNK_K} == 0 and N % 16 == 0"
        if p.group_k and p.group_k % SKINNY_CHUNK_K:
            return f"needs a K-group size that is a multiple of {SKINNY_CHUNK_K}"
        if p.row_scales and p.k > SKINNY_MAX_ROW_K:
            return f"K over {SKINNY_MAX_ROW_K} with row scales: the int32 sum could overflow"
        if SKINNY_MODE == "0":
            return "policy: turned off (ZQ_GEMM_SKINNY=0)"
        if SKINNY_MODE == "auto" and d.capability != (9, 0):
            return "policy: measured against the other kernels on sm_90 only (ZQ_GEMM_SKINNY=1 takes it)"
        if SKINNY_MODE == "auto" and p.w_bits == 8 and p.row_scales:
            # FP8 rows: the INT8 rows' limits (the same bytes a weight and MMA shape, the Hopper kernel beside it)
            max_n = next(n for m, n in SKINNY_INT8_MAX_N if p.m <= m)
            if p.n > max_n:
                return (f"policy: {'FP8' if p.op == 'fp8_gemm_dequant' else 'INT8'} row scales at this M with "
                        f"N > {max_n}: the Hopper / mma kernels are faster")
        return None

    @staticmethod
    def _fp8_reason(p, d):
        if d.tensorrt:
            return FP8_TENSORRT
        why = _device_reason(d) or _epilogue_reason(p)
        if why:
            return why
        if d.capability < (9, 0):
            return "FP8 weights: needs compute capability 9.0 or later (mma.sync e4m3)"
        if p.out_dtype not in HALF:
            return "float32 output: its epilogue writes fp16 / bf16"
        return None


class Sm90(GemmKernel):
    name, c_id, may_decline_at_run_time = "sm90", 2, True  # M past 2^31
    summary = "CUTLASS 3 Hopper wgmma, INT8 weights with row scales (INT4 unpacked per call)"

    def can_implement(self, p, d):
        why = _device_reason(d) or _epilogue_reason(p)
        if why:
            return why
        if d.capability != (9, 0):
            return "needs compute capability 9.0 (sm_90a code)"
        if not d.sm90_library:
            return "the kernel library was built without it (ZQ_WITH_SM90_GEMM=OFF or no CUTLASS)"
        why = _int8_x_half_out(p)
        if why:
            return why
        if p.k % 16 or p.n % 8:
            return "needs K % 16 == 0 and N % 8 == 0"
        if not p.row_scales:
            return "K-group scales: it takes one scale per weight row"
        if p.m <= SMALL_M:
            return f"policy: M <= {SMALL_M}: the CUDA-core kernel is faster (the Hopper kernel's ~5 us floor)"
        return None


class Fp16Dequant(GemmKernel):
    name = "fp16_dequant"
    summary = "the weight dequantized to the output dtype per call, then cuBLAS (PyTorch; not in the C library)"

    def can_implement(self, p, d):
        if d.tensorrt:
            return "not in the C kernel library (dequantize + cuBLAS in PyTorch): TensorRT cannot run it"
        why = _int_weights(p) or _device_reason(d) or _epilogue_reason(p)
        if why:
            return why
        if p.op == "int8_gemm_dequant":
            if not _hopper_tensor_cores(p, d):
                return ("policy: measured against the INT8 kernels on Hopper only (sm_90 with the Hopper GEMM, "
                        "fp16/bf16 out, K % 16, N % 8)")
            if p.m <= SMALL_M_KGROUPS:
                return f"policy: M <= {SMALL_M_KGROUPS}: the CUDA-core kernel is faster"
        elif p.m <= SMALL_M_KGROUPS and p.x_dtype != "float32":
            return f"policy: M <= {SMALL_M_KGROUPS}: the CUDA-core kernel reads the weight once, dequantized in place"
        return None


class Simt(GemmKernel):
    name, c_id = "simt", 0
    summary = "CUDA cores (dp4a for A8), any shape: decode-sized M, and every problem the others decline"

    def can_implement(self, p, d):
        why = _int_weights(p) or _device_reason(d) or _epilogue_reason(p)
        if why:
            return why
        if p.x_dtype not in ("int8", *HALF):
            return f"{p.x_dtype} activations: it reads int8, fp16 or bf16 x"
        if p.group_k and p.k % p.group_k:
            return "a K-group size that does not divide K"
        if p.w_bits == 4 and p.k % 2:
            return "INT4 with an odd K"
        return None


class Sm90Fp8(GemmKernel):
    name, c_id, may_decline_at_run_time = "sm90_fp8", 4, True  # x / wq / out / residual 16-byte aligned
    summary = ("CUTLASS 3 Hopper wgmma, FP8 E4M3 x FP8 E4M3 with row scales, fp32 accumulation, the epilogue fused "
               "(fp16 / bf16 out); ZQ_GEMM_SM90_FP8=0 turns it off (scaled_mm then)")

    def can_implement(self, p, d):
        if d.tensorrt:
            return FP8_TENSORRT
        why = _device_reason(d) or _epilogue_reason(p)
        if why:
            return why
        if p.op != "fp8_gemm_dequant":
            return "FP8 x FP8 only"
        if d.capability != (9, 0):
            return "needs compute capability 9.0 (sm_90a code)"
        if not d.sm90_library:
            return "the kernel library was built without it (ZQ_WITH_SM90_GEMM=OFF or no CUTLASS)"
        if p.out_dtype not in HALF:
            return "float32 output: its epilogue writes fp16 / bf16"
        if p.k % 16 or p.n % 16:
            return "needs K % 16 == 0 and N % 16 == 0"
        if SM90_FP8_MODE != "1":
            return "policy: turned off (ZQ_GEMM_SM90_FP8=0)"
        return None


class ScaledMm(GemmKernel):
    name = "scaled_mm"
    summary = ("torch._scaled_mm (cuBLASLt / CUTLASS in PyTorch), FP8 E4M3 x FP8 E4M3 with row-wise scales, bf16 "
               "out; bias / activation / residual applied after it in PyTorch (not fused)")

    def can_implement(self, p, d):
        if d.tensorrt:
            return "PyTorch's op, not in the C kernel library: TensorRT cannot run it"
        why = _device_reason(d)
        if why:
            return why
        if p.op != "fp8_gemm_dequant":
            return "FP8 x FP8 only"
        if d.capability != (9, 0):
            # torch's row-wise scaled_mm also builds for sm_89 / sm_100; only the H200 path is what we test
            return "policy: row-wise FP8 scaled_mm is used on sm_90 (the device it is tested on)"
        if p.k % 16 or p.n % 16:
            return "needs K % 16 == 0 and N % 16 == 0 (FP8 tensor-core tiles)"
        if p.out_dtype not in FLOATS:
            return f"{p.out_dtype} output"
        return None


class Reference(GemmKernel):
    name = "reference"
    summary = "the op's reference implementation (plain torch): CPU, or inputs no kernel takes (counted, warned)"

    def can_implement(self, p, d):
        return "no reference implementation inside TensorRT" if d.tensorrt else None


SKINNY, MMA, SM90, FP16_DEQUANT, SIMT, REFERENCE = Skinny(), Mma(), Sm90(), Fp16Dequant(), Simt(), Reference()
SM90_FP8, SCALED_MM, WGMMA, SM90_TWO_LEVEL = Sm90Fp8(), ScaledMm(), Wgmma(), Sm90TwoLevel()
# priority order
KERNELS: tuple[GemmKernel, ...] = (SKINNY, SM90_TWO_LEVEL, WGMMA, MMA, SM90, FP16_DEQUANT, SIMT, SM90_FP8, SCALED_MM,
                                   REFERENCE)
BY_NAME = {k.name: k for k in KERNELS}


class NoGemmKernel(ValueError):
    """No kernel implements the problem (only possible for TensorRT: elsewhere the reference takes everything)."""


@dataclass(frozen=True)
class GemmChoice:
    kernel: GemmKernel
    fallback: Optional[GemmKernel]  # runs when `kernel` declines at run time
    skipped: tuple[tuple[str, str], ...]  # (kernel, reason) of every kernel before it in KERNELS
    device: GemmDevice

    @property
    def label(self) -> str:
        """What the plan shows: 'mma', 'reference (CPU)', 'reference (no CUDA library)'."""
        if self.kernel is REFERENCE and self.device.capability is None:
            return "reference (CPU)"
        if self.kernel is REFERENCE and not self.device.library:
            return "reference (no CUDA library)"
        return self.kernel.name

    def reason(self, kernel: str) -> Optional[str]:
        return dict(self.skipped).get(kernel)


def choose_gemm(problem: GemmProblem, device: GemmDevice) -> GemmChoice:
    """The first kernel of KERNELS that implements `problem` on `device`, with the reasons of those skipped;
    NoGemmKernel with every kernel's reason when none does."""
    return _choose(problem.key(), device)


@functools.lru_cache(maxsize=8192)
def _choose(problem: GemmProblem, device: GemmDevice) -> GemmChoice:
    reasons = [(k, k.can_implement(problem, device)) for k in KERNELS]
    for i, (kernel, why) in enumerate(reasons):
        if why is None:
            fallback = next((k for k, w in reasons[i + 1:] if w is None), None) \
                if kernel.may_decline_at_run_time else None
            return GemmChoice(kernel, fallback, tuple((k.name, w) for k, w in reasons[:i]), device)
    raise NoGemmKernel(f"no GEMM kernel takes {problem.describe()} on {device.describe()}: "
                       + "; ".join(f"{k.name}: {w}" for k, w in reasons))


@contextlib.contextmanager
def _policy(name: str, mode: str):
    """This module's policy variable `name` set to `mode` inside the block, the memoized choices dropped on the way
    in and out. CUDA graphs captured before keep their kernels."""
    old = globals()[name]
    globals()[name] = mode
    _choose.cache_clear()
    try:
        yield
    finally:
        globals()[name] = old
        _choose.cache_clear()


def skinny_mode(mode: str):
    """`with skinny_mode(mode):` the decode-shaped kernel's policy (SKINNY_MODES) inside the block (A/B
    measurements, tests)."""
    return _policy("SKINNY_MODE", _check_skinny_mode(mode, "skinny_mode"))


def wgmma_mode(mode: str):
    """`with wgmma_mode(mode):` the Hopper K-group kernel's policy (WGMMA_MODES) inside the block (A/B
    measurements, tests)."""
    return _policy("WGMMA_MODE", _check_wgmma_mode(mode, "wgmma_mode"))


def two_level_mode(mode: str):
    """`with two_level_mode(mode):` the two-level INT4 path's policy (TWO_LEVEL_MODES) inside the block (A/B
    measurements, tests)."""
    return _policy("TWO_LEVEL_MODE", _check_two_level_mode(mode, "two_level_mode"))


def sm90_fp8_mode(mode: str):
    """`with sm90_fp8_mode(mode):` the Hopper FP8 kernel's gate (SM90_FP8_MODES) inside the block (benchmarks,
    tests)."""
    return _policy("SM90_FP8_MODE", _check_sm90_fp8_mode(mode, "sm90_fp8_mode"))


def plan_buckets(problem: GemmProblem, device: GemmDevice) -> list[GemmChoice]:
    """The choice for each M bucket (M_BUCKETS order)."""
    return [choose_gemm(replace(problem, m=lo), device) for lo, _ in M_BUCKETS]


def plan_text(problem: GemmProblem, device: GemmDevice) -> str:
    """The TensorRT plugin's kernel_plan field: '4:simt,16:simt,64:mma/sm90,1024:sm90/simt,inf:sm90/simt'
    (max M of each bucket: kernel[/fallback]), parsed by zq_gemm_plan_parse."""
    if not device.tensorrt:
        raise ValueError("kernel_plan is for TensorRT: plan it with GemmDevice(..., tensorrt=True)")
    entries = []
    for (_, hi), c in zip(M_BUCKETS, plan_buckets(problem, device)):
        assert c.kernel.c_id is not None and (c.fallback is None or c.fallback.c_id is not None), c
        entries.append(f"{'inf' if hi == math.inf else int(hi)}:{c.kernel.name}"
                       + (f"/{c.fallback.name}" if c.fallback else ""))
    return ",".join(entries)
