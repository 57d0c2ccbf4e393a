// Fused bias + activation (or SiLU-style gating act(gate) * x) -> token-wise INT8 quantization.
// x, gate: rows of k elements in `dt`, row r at r * ld (ld >= k: e.g. the two halves of a fused gate/up GEMM's
// [rows, 2k] output read in place with ld = 2k); bias: [k] in `dt`; out: [rows, k] in `dt`; q: [rows, k] int8;
// scale: [rows] fp32. bias, gate, out may be null. act is a zq_act. Rows up to 56K elements.
#pragma once
#include "zq/common.h"

ZQ_API cudaError_t zq_act_quant(const void* x, const void* bias, const void* gate, zq_dtype dt, int64_t rows,
                                int64_t k, int64_t ld, int act, int8_t* q, float* scale, void* out,
                                cudaStream_t stream);
// The same with FP8 E4M3 codes (quant_math.quantize_per_token_fp8 of the activation): q [rows, k]
// float8_e4m3fn bytes, scale = amax / 448 per token.
ZQ_API cudaError_t zq_act_quant_fp8(const void* x, const void* bias, const void* gate, zq_dtype dt, int64_t rows,
                                    int64_t k, int64_t ld, int act, void* q, float* scale, void* out,
                                    cudaStream_t stream);
