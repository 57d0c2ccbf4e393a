// Fused (residual add) -> LayerNorm / RMSNorm -> token-wise INT8 quantization, one pass per token.
// x, residual, out, hsum: [rows, k] in `dt`; weight, bias: [k] in `dt`; q: [rows, k] int8; scale: [rows] fp32.
// residual, bias, out, hsum may be null (not added / not written). is_rms selects RMSNorm (bias unused).
// Rows up to 56K elements (the row is cached in shared memory as fp32).
#pragma once
#include "zq/common.h"

ZQ_API cudaError_t zq_norm_quant(const void* x, const void* residual, const void* weight, const void* bias,
                                 zq_dtype dt, int64_t rows, int64_t k, float eps, int is_rms, int8_t* q,
                                 float* scale, void* out, void* hsum, cudaStream_t stream);
// The same with FP8 E4M3 codes (quant_math.quantize_per_token_fp8 of the normalised row): q [rows, k]
// float8_e4m3fn bytes, scale = amax / 448 per token.
ZQ_API cudaError_t zq_norm_quant_fp8(const void* x, const void* residual, const void* weight, const void* bias,
                                     zq_dtype dt, int64_t rows, int64_t k, float eps, int is_rms, void* q,
                                     float* scale, void* out, void* hsum, cudaStream_t stream);
