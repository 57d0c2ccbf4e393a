// Shared types of the zq kernel library's C launch API (used by the Python binding through ctypes and by
// the TensorRT plugins). Every launch function takes raw device pointers and a cudaStream_t, launches on
// that stream, and returns a cudaError_t (cudaSuccess, or the launch / argument error).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
#define ZQ_API extern "C" __attribute__((visibility("default")))
#else
#define ZQ_API __attribute__((visibility("default")))
#endif

// Element types of float tensors (activations, norm weights, bias, residual, GEMM outputs); ZQ_FP8_E4M3 only
// as the x_dt of an FP8 GEMM (zq_gemm_sm90_fp8), never as an output or a row kernel's input (the row kernels'
// FP8 codes come from their *_fp8 entry points).
typedef enum { ZQ_F32 = 0, ZQ_F16 = 1, ZQ_BF16 = 2, ZQ_FP8_E4M3 = 3 } zq_dtype;

// Activations, the same names and order as zqcompile.ops.quant_math.ACTIVATIONS.
typedef enum { ZQ_ACT_NONE = 0, ZQ_ACT_GELU = 1, ZQ_ACT_GELU_TANH = 2, ZQ_ACT_RELU = 3, ZQ_ACT_SILU = 4 } zq_act;

// Library version, bumped when a launch signature changes (the binding checks it).
#define ZQ_ABI_VERSION 16
ZQ_API int zq_abi_version(void);
// Per-token row kernels (quantize_per_token, norm_quant, act_quant) on sm_90+: rows at or under which a long
// row (K > 1024) is split over a cluster of 8 blocks. -1 (default): the library's choice (act_quant only, 8 x
// rows at most twice the SM count), 0: never, n > 0: up to n rows, every row kernel. For A/B measurements and
// tests; process-wide.
ZQ_API void zq_set_row_split(int max_rows);
// Programmatic dependent launch (zq/launch.cuh) of the library's kernels on sm_90+: -1 (default) or 1 = on where
// the device supports it, 0 = off (every kernel waits for the one ahead to finish before it is scheduled). For
// A/B measurements; process-wide; a CUDA graph keeps the launches it captured.
ZQ_API void zq_set_pdl(int mode);
// The decode-shaped GEMM (zq_gemm_skinny) asks L2 to prefetch its blocks' weight rows before it waits on the
// kernel ahead (programmatic dependent launch), for the blocks whose rows end within `bytes` of the weight's
// start: -1 (default) = the library's choice (none: measured slower on the H200), 0 = none, n = n bytes. Results
// do not change. For A/B measurements; process-wide; a CUDA graph keeps the value its launches were captured with.
ZQ_API void zq_set_gemm_prefetch(int64_t bytes);
// 1 when the Hopper (CUTLASS 3 sm90, wgmma) INT8 and FP8 GEMMs were compiled in.
ZQ_API int zq_has_sm90_gemm(void);
// Text of a cudaError_t returned by a launch function.
ZQ_API const char* zq_error_string(cudaError_t e);
