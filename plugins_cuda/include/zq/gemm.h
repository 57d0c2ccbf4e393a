// GEMMs with the ZeroQuant dequantization fused (quant_math.int8_gemm_dequant / weight_only_gemm):
//   out[m, n] = epilogue( sum_g (sum_{k in g} x[m,k] * w[n,k]) * w_scale[n,g] * x_scale[m] )
//   epilogue(y) = act(y + bias[n]) + residual[m, n], written once in out_dt.
// x: [M, K] int8 (A8, x_scale [M] fp32) or float in x_dt (A16, x_scale null).
// wq: [N, K] int8 (w_bits 8) or [N, K/2] uint8 packed INT4 (w_bits 4: even k in the low nibble).
// FP8 (w_fp8 = 1): x [M, K] FP8 E4M3 (x_dt ZQ_FP8_E4M3, x_is_int8 0, x_scale [M]) times wq [N, K] FP8 E4M3
// (w_bits 8), the products summed in fp32 (quant_math.fp8_gemm_dequant); zq_gemm_sm90_fp8 and, at M <= 64,
// zq_gemm_skinny take it, the other kernels decline it (zq_gemm_run says no for them).
// w_scale: [N, groups] fp32, groups = 1 (row groups, per tensor) or K / group_k (K groups).
// bias [N] and residual [M, N] are in out_dt and may be null. All tensors contiguous.
#pragma once
#include "zq/common.h"

typedef struct {
  const void* x; zq_dtype x_dt; int x_is_int8; const float* x_scale;
  const void* wq; int w_bits; int w_fp8; const float* w_scale; int64_t groups;
  const void* bias; const void* residual; int act;
  void* out; zq_dtype out_dt;
  int64_t m, n, k;
} zq_gemm_args;

// CUDA-core path (dp4a for A8): any shape, INT8/INT4, row or K-group scales, A8 or A16. Reads the weight
// once per 16 rows of x, so it is the fast path for decode-sized M (<= 16) and the fallback otherwise.
ZQ_API cudaError_t zq_gemm_simt(const zq_gemm_args* a, cudaStream_t stream);

// Hopper path (CUTLASS 3.x, wgmma, TMA; sm_90a): A8 x INT8 weights with one scale per weight row
// (groups == 1), fp16/bf16 out, K % 16 == 0, N % 8 == 0, x, wq, out and residual 16-byte aligned (TMA), x_scale
// and w_scale non-null. Returns cudaErrorNotSupported without launching when the problem is outside that, or when
// the library was built without it (zq_has_sm90_gemm() == 0).
ZQ_API cudaError_t zq_gemm_sm90(const zq_gemm_args* a, cudaStream_t stream);

// The Hopper FP8 GEMM (the same CUTLASS 3.x template and epilogue, FP8 E4M3 wgmma with fp32 accumulation, not the
// FastAccum schedule): out = act((acc * w_scale[n]) * x_scale[m] + bias[n]) + residual. Takes: w_fp8 = 1, x_dt
// ZQ_FP8_E4M3, x_is_int8 = 0, w_bits 8, groups == 1; fp16/bf16 out; K % 16 == 0, N % 16 == 0; x, wq, out and
// residual 16-byte aligned, bias 2-byte aligned; x_scale and w_scale non-null; M, N, K < 2^31. Anything else, or
// a library without the Hopper GEMMs, returns cudaErrorNotSupported without launching.
ZQ_API cudaError_t zq_gemm_sm90_fp8(const zq_gemm_args* a, cudaStream_t stream);
// Benchmarks and tests: configuration cfg (0..zq_gemm_sm90_fp8_num_configs()-1: gemm_sm90.cuh's FP8 table; -1
// picks one). 0 configurations when the library has no sm90 GEMM.
ZQ_API cudaError_t zq_gemm_sm90_fp8_config(const zq_gemm_args* a, int cfg, cudaStream_t stream);
ZQ_API int zq_gemm_sm90_fp8_num_configs(void);

// Tensor-core path for sm_80 and later (mma.sync m16n8k32 s8; the A100 path, and on Hopper the path of INT4
// weights and of K-group scales): A8 x INT8 or packed INT4 weights (unpacked in the mainloop, never in memory),
// row scales or K-group scales. Takes: x_is_int8; w_bits 8 or 4; out_dt fp16 or bf16; K % 32 == 0; N % 8 == 0;
// groups == 1 or group_k = K / groups with group_k % 32 == 0; K (groups == 1) or group_k at most 65536 (so the
// int32 sum of a group is exact); x and wq 16-byte aligned, out and residual 4-byte aligned; x_scale and w_scale
// non-null; any M (M <= 65535 row tiles); a device of compute capability 8.0 or later. Anything else returns
// cudaErrorNotSupported without launching (zq_gemm_simt takes every shape).
ZQ_API cudaError_t zq_gemm_mma(const zq_gemm_args* a, cudaStream_t stream);
// Benchmarks and tests: the mma GEMM with tile configuration cfg (0..zq_gemm_mma_num_configs()-1; -1 picks one).
ZQ_API cudaError_t zq_gemm_mma_config(const zq_gemm_args* a, int cfg, cudaStream_t stream);
ZQ_API int zq_gemm_mma_num_configs(void);

// Decode-shaped tensor-core path for sm_80 and later (gemm_skinny.cu: swap-AB mma.sync m16n8k32 s8, the weight
// streamed from global memory straight into the fragments, split-K over the 8 warps of a block): A8 x INT8 or
// packed INT4 weights, row scales or K-group scales, M <= 64 tokens. Takes: x_is_int8; w_bits 8 or 4; out_dt
// fp16 or bf16; 1 <= M <= 64; K % 128 == 0; N % 16 == 0; groups == 1 with K <= 65536, or group_k = K / groups with
// group_k % 128 == 0; x and wq 16-byte aligned, out, bias and residual 2-byte aligned; x_scale and w_scale non-null;
// compute capability 8.0 or later. Or FP8 (w_fp8 = 1: x_dt ZQ_FP8_E4M3, x_is_int8 0, w_bits 8, groups 1; the same
// shape and alignment rules, any K, mma.sync e4m3 with fp32 sums) on compute capability 9.0 or later,
// configurations 0-2 only. Anything else returns cudaErrorNotSupported without launching.
ZQ_API cudaError_t zq_gemm_skinny(const zq_gemm_args* a, cudaStream_t stream);
// Benchmarks and tests: configuration cfg (0: 16 weight rows a block, 1: 32 rows, M <= 32 and N % 32 == 0 only,
// 2: 16 rows with the tokens split over two groups of 4 warps, 3: 128 rows a block sharing x through shared memory,
// K split over a thread-block cluster, sm_90 and N % 128 == 0 only, and the block's x slice within 113 KB;
// 4: Hopper wgmma m64n64k32 with the weight as the register operand and x staged in shared memory, 64 rows a
// block, K split over a cluster, compute capability 9.0 and N % 64 == 0 only (gemm_skinny_wgmma.cu); -1 picks one).
ZQ_API cudaError_t zq_gemm_skinny_config(const zq_gemm_args* a, int cfg, cudaStream_t stream);
ZQ_API int zq_gemm_skinny_num_configs(void);

// Large-M Hopper path for K-group weights (gemm_wgmma.cu, sm_90a: wgmma s8 with both operands in shared memory,
// INT4 unpacked there per stage, the K groups folded into fp32 per group; the same bits as zq_gemm_mma):
// A8 x INT8 or packed INT4 weights, K-group scales (or one scale a row). Takes: x_is_int8; w_bits 8 or 4; out_dt
// fp16 or bf16; K % 128 == 0; N % 128 == 0; groups == 1 (K <= 65536) or group_k = K / groups with
// group_k % 128 == 0 and group_k <= 65536; x and wq 16-byte aligned, out and residual 4-byte aligned; x_scale and
// w_scale non-null; M <= 65535 * 64; compute capability 9.x. Anything else returns cudaErrorNotSupported without
// launching.
ZQ_API cudaError_t zq_gemm_wgmma(const zq_gemm_args* a, cudaStream_t stream);
// Benchmarks and tests: configuration cfg (tokens a block, 0: 128, one block an SM; 1: 64, two blocks an SM;
// 2: 128 with the fold and the next stage's unpack under the MMAs, not yet run on a GPU; the same bits; -1 picks
// 0 or 1).
ZQ_API cudaError_t zq_gemm_wgmma_config(const zq_gemm_args* a, int cfg, cudaStream_t stream);
ZQ_API int zq_gemm_wgmma_num_configs(void);

// Weight helpers for the large-M paths that reuse the INT8 / fp16 tensor-core GEMMs.
// INT4 packed [N, K/2] -> int8 [N, K].
ZQ_API cudaError_t zq_unpack_int4(const uint8_t* wq, int64_t n, int64_t k, int8_t* out, cudaStream_t stream);
// INT4 packed [N, K/2] with two-level K-group scales [N, groups] (each u x the row's base = max / 15, u in 1..15:
// zqcompile's WeightQuant(group_scales="two-level")) -> int8 code x u [N, K] and the base [N], so the INT8 GEMM
// with row scales computes the same products. K and K / groups multiples of 16 (else cudaErrorInvalidValue); wq
// 8-byte and out 16-byte aligned (else cudaErrorNotSupported).
ZQ_API cudaError_t zq_unpack_int4_two_level(const uint8_t* wq, const float* w_scale, int64_t groups, int64_t n,
                                            int64_t k, int8_t* out, float* row_scale, cudaStream_t stream);
// [N, K] int8 or packed INT4 with scales [N, groups] -> float [N, K] in out_dt.
ZQ_API cudaError_t zq_dequantize_weight(const void* wq, int w_bits, const float* w_scale, int64_t groups, int64_t n,
                                        int64_t k, void* out, zq_dtype out_dt, cudaStream_t stream);

// Benchmarks and tests: run the Hopper GEMM with tile configuration cfg (0..zq_gemm_sm90_num_configs()-1;
// -1 picks one). 0 when the library has no sm90 GEMM.
ZQ_API cudaError_t zq_gemm_sm90_config(const zq_gemm_args* a, int cfg, cudaStream_t stream);
ZQ_API int zq_gemm_sm90_num_configs(void);

// ---- the dispatcher: one entry point for the torch binding and the TensorRT plugin ----------------------------
// The kernels above by id; zqcompile/plugins/gemm_kernels.py names them the same and chooses among them (per GEMM
// and M bucket, recorded in the compile plan and handed to the TensorRT plugin as its kernel_plan field). Nothing
// here chooses: zq_gemm_run runs the kernel it is told to.
typedef enum {
  ZQ_GEMM_SIMT = 0, ZQ_GEMM_MMA = 1, ZQ_GEMM_SM90 = 2, ZQ_GEMM_SKINNY = 3, ZQ_GEMM_SM90_FP8 = 4,
  ZQ_GEMM_WGMMA = 5, ZQ_GEMM_NUM_KERNELS = 6
} zq_gemm_kernel;

// "simt", "mma", "sm90", "skinny", "sm90_fp8", "wgmma"; NULL for an unknown id.
ZQ_API const char* zq_gemm_kernel_name(int kernel);
// 1 when `kernel` can run on the current device with this library (mma, skinny: sm_80+; wgmma: sm_90; sm90,
// sm90_fp8: sm_90 and the library built with them), else 0.
ZQ_API int zq_gemm_kernel_available(int kernel);
// Workspace zq_gemm_run needs: N * K bytes for sm90 with INT4 weights (unpacked to int8 per call), else 0.
ZQ_API size_t zq_gemm_workspace_bytes(int kernel, int64_t n, int64_t k, int w_bits);
// Run GEMM kernel `kernel` (its default tile configuration) on `a`. cudaErrorNotSupported, with nothing launched,
// when that kernel declines the problem or cannot run on this device (FP8 operands, w_fp8 = 1, to any kernel but
// sm90_fp8, and integer ones to sm90_fp8, included): the caller then runs its plan's fallback.
// cudaErrorInvalidValue for an unknown id or a workspace smaller than zq_gemm_workspace_bytes.
ZQ_API cudaError_t zq_gemm_run(int kernel, const zq_gemm_args* a, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream);

// A kernel plan as text (the TensorRT plugins' kernel_plan field, written by zqcompile's exporter):
// "<max M>:<kernel>[/<fallback>],...,inf:<kernel>[/<fallback>]", max M strictly increasing, the last entry "inf";
// e.g. "4:simt,16:simt,64:mma/sm90,2048:sm90/simt,inf:sm90/simt". An M runs the kernel of the first entry whose
// max M is >= M; the fallback (-1: none) runs when that kernel declines at run time (alignment, grid limits).
#define ZQ_GEMM_PLAN_MAX 8
typedef struct {
  int count;
  int64_t max_m[ZQ_GEMM_PLAN_MAX];  // INT64_MAX for "inf"
  int kernel[ZQ_GEMM_PLAN_MAX];
  int fallback[ZQ_GEMM_PLAN_MAX];
} zq_gemm_plan;
// 0 and *plan filled, or -1 (plan untouched) when the text is malformed.
ZQ_API int zq_gemm_plan_parse(const char* text, zq_gemm_plan* plan);
// Index of the entry serving M (every M >= 0 has one in a parsed plan).
ZQ_API int zq_gemm_plan_find(const zq_gemm_plan* plan, int64_t m);
