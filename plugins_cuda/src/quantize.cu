// Per-token and per-tensor INT8 quantization of activations: one block per token, two reads of the row
// (the second hits L2), so any K works.
#include "zq/device_math.cuh"
#include "zq/quantize.h"

namespace zq {

template <class T>
__global__ void quantize_per_token_kernel(const T* __restrict__ x, int64_t k, int8_t* __restrict__ q,
                                          float* __restrict__ scale) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * k;
  float amax = 0.f;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) amax = fmaxf(amax, fabsf(to_f<T>(xr[i])));
  amax = fmaxf(block_max(amax, red), kEps);
  const float inv = 127.f / amax;
  int8_t* qr = q + row * k;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) qr[i] = quantize_one(to_f<T>(xr[i]), inv);
  if (threadIdx.x == 0) scale[row] = amax / 127.f;
}

template <class T>
__global__ void quantize_per_tensor_kernel(const T* __restrict__ x, int64_t rows, int64_t k,
                                           const float* __restrict__ scale, int8_t* __restrict__ q,
                                           float* __restrict__ row_scale) {
  const float s = *scale;
  const float inv = 1.f / s;
  const int64_t n = rows * k;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    q[i] = quantize_one(to_f<T>(x[i]), inv);
  for (int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += stride) row_scale[r] = s;
}

}  // namespace zq

ZQ_API cudaError_t zq_quantize_per_token(const void* x, zq_dtype dt, int64_t rows, int64_t k, int8_t* q,
                                         float* scale, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (k <= 0 || rows > INT32_MAX) return cudaErrorInvalidValue;
  const int threads = zq::row_threads(k);
  ZQ_DISPATCH_DTYPE(dt, T, zq::quantize_per_token_kernel<T><<<(unsigned)rows, threads, 0, stream>>>(
                               static_cast<const T*>(x), k, q, scale));
  return cudaGetLastError();
}

ZQ_API cudaError_t zq_quantize_per_tensor(const void* x, zq_dtype dt, int64_t rows, int64_t k,
                                          const float* scale, int8_t* q, float* row_scale, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int64_t n = rows * k;
  const int threads = 256;
  const int64_t want = (n + threads * 4 - 1) / (threads * 4);
  const unsigned blocks = (unsigned)(want < 1 ? 1 : (want > 65535 ? 65535 : want));
  ZQ_DISPATCH_DTYPE(dt, T, zq::quantize_per_tensor_kernel<T><<<blocks, threads, 0, stream>>>(
                               static_cast<const T*>(x), rows, k, scale, q, row_scale));
  return cudaGetLastError();
}
