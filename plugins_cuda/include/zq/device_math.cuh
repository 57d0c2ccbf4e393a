// Device-side helpers shared by the kernel families: dtype conversion, the activation functions and the
// per-token code formats of zqcompile/ops/quant_math.py: INT8 (multiply by 127/amax in fp32, round half to
// even, clamp to +-127) and FP8 E4M3 (multiply by 448/amax, round to nearest even, saturate at +-448), amax
// floored at EPS.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_fp16.h>
#include <math.h>
#include "zq/common.h"
#include "zq/launch.cuh"

namespace zq {

constexpr float kEps = 1e-8f;  // quant_math.EPS

template <class T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Round a float through T and back: the torch reference materialises intermediates in the model dtype.
template <class T> __device__ __forceinline__ float round_to(float v) { return to_f<T>(from_f<T>(v)); }

__host__ __device__ __forceinline__ float apply_act(float x, int act) {
  switch (act) {
    case ZQ_ACT_GELU: return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
    case ZQ_ACT_GELU_TANH: {
      const float inner = 0.7978845608028654f * (x + 0.044715f * x * x * x);
      return 0.5f * x * (1.f + tanhf(inner));
    }
    case ZQ_ACT_RELU: return x > 0.f ? x : 0.f;
    case ZQ_ACT_SILU: return x / (1.f + expf(-x));
    default: return x;
  }
}

__device__ __forceinline__ int8_t quantize_one(float v, float inv) {
  float q = rintf(v * inv);  // rintf rounds half to even, like torch.round
  q = fminf(fmaxf(q, -127.f), 127.f);
  return static_cast<int8_t>(q);
}

// The per-token code of a row kernel's output: kMax (the code's largest magnitude: scale = amax / kMax) and
// the byte of one value already multiplied by kMax / amax. Row kernels are templates on it, so the INT8 and
// the FP8 E4M3 producers share every other line.
// encode4: four codes in one word (byte i = value i), for values whose row amax set `inv` (|v| <= amax).
struct Int8Code {
  static constexpr float kMax = 127.f;
  __device__ __forceinline__ static int8_t encode(float v, float inv) { return quantize_one(v, inv); }
  // rint(v * inv) without FRND / clamp / F2I (quarter-rate conversions): the product rounded to fp32 first (as
  // quantize_one; __fmul_rn keeps it from contracting into the add), then + 1.5 * 2^23, which rounds it to the
  // nearest integer, ties to even, in the low mantissa bits: their byte is the two's-complement code. No clamp
  // needed: |v| <= amax bounds |v * inv| by 127 * (1 + 2^-24)^3 < 127.5. (A NaN gives -1, quantize_one -127.)
  __device__ __forceinline__ static uint32_t encode4(float a, float b, float c, float d, float inv) {
    constexpr float kShift = 12582912.f;
    const uint32_t qa = __float_as_uint(__fadd_rn(__fmul_rn(a, inv), kShift));
    const uint32_t qb = __float_as_uint(__fadd_rn(__fmul_rn(b, inv), kShift));
    const uint32_t qc = __float_as_uint(__fadd_rn(__fmul_rn(c, inv), kShift));
    const uint32_t qd = __float_as_uint(__fadd_rn(__fmul_rn(d, inv), kShift));
    return __byte_perm(__byte_perm(qa, qb, 0x0040), __byte_perm(qc, qd, 0x0040), 0x5410);
  }
};
struct Fp8Code {  // quant_math.quantize_per_token_fp8: fp8(clamp(x * (448 / amax), -448, 448))
  static constexpr float kMax = 448.f;
  __device__ __forceinline__ static int8_t encode(float v, float inv) {
    return static_cast<int8_t>(__nv_cvt_float_to_fp8(v * inv, __NV_SATFINITE, __NV_E4M3));
  }
  __device__ __forceinline__ static uint32_t encode4(float a, float b, float c, float d, float inv) {  // 2 a cvt
    const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(a * inv, b * inv), __NV_SATFINITE, __NV_E4M3);
    const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(c * inv, d * inv), __NV_SATFINITE, __NV_E4M3);
    return lo | (hi << 16);
  }
};

// The multiplier kMax / amax exactly as quant_math.token_scale gets it: torch evaluates `qmax / amax` (a Python
// float over a tensor) as reciprocal(amax) * qmax, which differs from a true division by an ulp in about a quarter
// of the rows; with bf16 inputs that ulp moves ~0.1% of the FP8 codes (exact E4M3 ties).
template <class C> __device__ __forceinline__ float code_inv(float amax) { return C::kMax * (1.f / amax); }

// Block-wide reductions (blockDim.x a multiple of 32, at most 1024). `red` is 32 floats of shared memory.
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // red may still be read by a previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < nw ? red[lane] : 0.f;
  return warp_sum(v);
}
// `lowest`: the identity the lanes past the block's warps contribute (0 for |x| maxima, -inf for scores).
__device__ __forceinline__ float block_max(float v, float* red, float lowest = 0.f) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < nw ? red[lane] : lowest;
  return warp_max(v);
}

// Threads per row-kernel block: enough to cover short rows without idle warps.
inline int row_threads(int64_t k) { return k <= 256 ? 64 : (k <= 1024 ? 128 : (k <= 4096 ? 256 : 512)); }

}  // namespace zq

#define ZQ_DISPATCH_DTYPE(dt, T, ...)                                   \
  switch (dt) {                                                        \
    case ZQ_F32: { using T = float; __VA_ARGS__; } break;              \
    case ZQ_F16: { using T = __half; __VA_ARGS__; } break;             \
    case ZQ_BF16: { using T = __nv_bfloat16; __VA_ARGS__; } break;     \
    default: return cudaErrorInvalidValue;                             \
  }
