// The LayerNorm / RMSNorm element map the norm kernels share (norm_quant.cu, and the decode GEMM's RMSNorm
// prologue in gemm_skinny.cu), so every kernel that normalises a row rounds it alike.
#pragma once
#include "zq/device_math.cuh"

namespace zq {

// The normalised, scaled output of one element, rounded to T (kRound; the vector kernel leaves the last rounding
// to pack<T>, which rounds the same way); shared by both kernels so they round alike.
// The bias add is an explicit fma: what nvcc contracts `t * w + b` to, and what torch's layer_norm computes.
template <class T, bool kRms, bool kRound = true>
__device__ __forceinline__ float norm_affine(float h, float mean, float rstd, float w, float b, bool has_bias) {
  float y;
  if constexpr (kRms) {
    y = w * round_to<T>(h * rstd);
  } else {
    const float t = (h - mean) * rstd;
    y = has_bias ? __fmaf_rn(t, w, b) : t * w;
  }
  return kRound ? round_to<T>(y) : y;
}

}  // namespace zq
