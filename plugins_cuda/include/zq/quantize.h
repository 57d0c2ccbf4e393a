// Plain activation quantization (ZeroQuant token-wise INT8 or FP8 E4M3, and static per-tensor INT8).
// x is [rows, k] contiguous in `dt`; q is [rows, k] int8; scale is [rows] fp32 (amax / 127 per token).
#pragma once
#include "zq/common.h"

ZQ_API cudaError_t zq_quantize_per_token(const void* x, zq_dtype dt, int64_t rows, int64_t k, int8_t* q,
                                         float* scale, cudaStream_t stream);
// The same with FP8 E4M3 codes (quant_math.quantize_per_token_fp8): q [rows, k] float8_e4m3fn bytes, scale =
// amax / 448 per token, codes rounded to nearest even and saturated at +-448.
ZQ_API cudaError_t zq_quantize_per_token_fp8(const void* x, zq_dtype dt, int64_t rows, int64_t k, void* q,
                                             float* scale, cudaStream_t stream);

// Static: one calibrated scale (a device fp32 scalar); row_scale [rows] receives that scale for every row
// so the GEMM op reads per-token scales either way.
ZQ_API cudaError_t zq_quantize_per_tensor(const void* x, zq_dtype dt, int64_t rows, int64_t k,
                                          const float* scale, int8_t* q, float* row_scale, cudaStream_t stream);
