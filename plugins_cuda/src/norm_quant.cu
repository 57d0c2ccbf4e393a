// LayerNorm / RMSNorm with the token-wise quantization fused (ZeroQuant Sec. 4.3: quantization is fused
// into the producer of a GEMM input). Intermediates are rounded to the model dtype exactly where the torch
// reference materialises them, so the int8 codes match it up to ties.
#include "zq/device_math.cuh"
#include "zq/norm_quant.h"

namespace zq {

template <class T, bool kRms>
__global__ void norm_quant_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                  const T* __restrict__ weight, const T* __restrict__ bias, int64_t k, float eps,
                                  int8_t* __restrict__ q, float* __restrict__ scale, T* __restrict__ out,
                                  T* __restrict__ hsum) {
  extern __shared__ float row[];
  __shared__ float red[32];
  const int64_t off = (int64_t)blockIdx.x * k;
  float sum = 0.f;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    float h = to_f<T>(x[off + i]);
    if (residual) {
      h = round_to<T>(h + to_f<T>(residual[off + i]));
      if (hsum) hsum[off + i] = from_f<T>(h);
    }
    row[i] = h;
    sum += kRms ? h * h : h;
  }
  sum = block_sum(sum, red);
  float mean = 0.f, rstd;
  if constexpr (kRms) {
    rstd = rsqrtf(sum / (float)k + eps);
  } else {
    mean = sum / (float)k;
    float var = 0.f;  // second pass over the cached row: exact for rows with large offsets (outliers)
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      const float d = row[i] - mean;
      var += d * d;
    }
    var = block_sum(var, red);
    rstd = rsqrtf(var / (float)k + eps);
  }
  float amax = 0.f;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    float y;
    if constexpr (kRms) {
      y = round_to<T>(to_f<T>(weight[i]) * round_to<T>(row[i] * rstd));
    } else {
      y = (row[i] - mean) * rstd * to_f<T>(weight[i]);
      if (bias) y += to_f<T>(bias[i]);
      y = round_to<T>(y);
    }
    row[i] = y;
    if (out) out[off + i] = from_f<T>(y);
    amax = fmaxf(amax, fabsf(y));
  }
  amax = fmaxf(block_max(amax, red), kEps);
  const float inv = 127.f / amax;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) q[off + i] = quantize_one(row[i], inv);
  if (threadIdx.x == 0) scale[blockIdx.x] = amax / 127.f;
}

template <class T, bool kRms>
cudaError_t launch_norm_quant(const void* x, const void* residual, const void* weight, const void* bias,
                              int64_t rows, int64_t k, float eps, int8_t* q, float* scale, void* out, void* hsum,
                              cudaStream_t stream) {
  const size_t smem = (size_t)k * sizeof(float);
  auto kernel = norm_quant_kernel<T, kRms>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  kernel<<<(unsigned)rows, row_threads(k), smem, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<const T*>(weight),
      static_cast<const T*>(bias), k, eps, q, scale, static_cast<T*>(out), static_cast<T*>(hsum));
  return cudaGetLastError();
}

}  // namespace zq

ZQ_API cudaError_t zq_norm_quant(const void* x, const void* residual, const void* weight, const void* bias,
                                 zq_dtype dt, int64_t rows, int64_t k, float eps, int is_rms, int8_t* q,
                                 float* scale, void* out, void* hsum, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (k <= 0 || k > 56 * 1024 || rows > INT32_MAX || weight == nullptr) return cudaErrorInvalidValue;
  ZQ_DISPATCH_DTYPE(dt, T,
                    return is_rms ? zq::launch_norm_quant<T, true>(x, residual, weight, nullptr, rows, k, eps, q,
                                                                   scale, out, hsum, stream)
                                  : zq::launch_norm_quant<T, false>(x, residual, weight, bias, rows, k, eps, q,
                                                                    scale, out, hsum, stream));
  return cudaSuccess;
}
