// Per-token (INT8 or FP8 E4M3 codes) and per-tensor INT8 quantization of activations. Per token: the vector path
// (zq/row_vec.cuh) reads the row once into registers; the scalar fallback takes one block per token and reads the
// row twice (the second read hits L2), so any K and alignment works.
#include "device_info.h"
#include "zq/device_math.cuh"
#include "zq/quantize.h"
#include "zq/row_vec.cuh"

namespace zq {

template <class C, class T>
__global__ void quantize_per_token_kernel(const T* __restrict__ x, int64_t k, int8_t* __restrict__ q,
                                          float* __restrict__ scale) {
  zq::pdl_begin();
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * k;
  float amax = 0.f;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) amax = fmaxf(amax, fabsf(to_f<T>(xr[i])));
  amax = fmaxf(block_max(amax, red), kEps);
  const float inv = code_inv<C>(amax);
  int8_t* qr = q + row * k;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) qr[i] = C::encode(to_f<T>(xr[i]), inv);
  if (threadIdx.x == 0) scale[row] = amax / C::kMax;
}

template <class C, class T, int kRow, int kVecs>
__global__ void __launch_bounds__(row_block_threads<T, kRow>())
quantize_per_token_vec_kernel(const T* __restrict__ x, int64_t rows, int64_t k, int8_t* __restrict__ q,
                              float* __restrict__ scale) {
  zq::pdl_begin();
  __shared__ float red[32];
  const RowPos p = row_pos<kRow>();
  if (p.row >= rows) return;  // a whole warp (warp rows); never taken with block or split rows
  const int64_t off = p.row * k;
  const int k8 = (int)(k / kPack);
  Raw<T> xv[kVecs];
  load_held_row(x + off, p, k8, xv);
  float amax = 0.f;
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    if (p.t + v * p.nthr < k8) amax = abs_max_raw<T>(amax, xv[v]);
  }
  quantize_held_row<C, T, kVecs, kRow>(xv, amax, p, k8, q + off, scale, red);
}

template <class T>
__global__ void quantize_per_tensor_kernel(const T* __restrict__ x, int64_t rows, int64_t k,
                                           const float* __restrict__ scale, int8_t* __restrict__ q,
                                           float* __restrict__ row_scale) {
  zq::pdl_begin();
  const float s = *scale;
  const float inv = 1.f / s;
  const int64_t n = rows * k;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    q[i] = quantize_one(to_f<T>(x[i]), inv);
  for (int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += stride) row_scale[r] = s;
}

static int g_split_rows = -1;  // zq_set_row_split

bool split_rows(int64_t rows, bool by_default) {
  DeviceInfo dev;
  if (g_split_rows == 0 || (g_split_rows < 0 && !by_default) || rows > 65535 || !current_device_info(&dev) ||
      !sm90_code())
    return false;
  return rows <= (g_split_rows > 0 ? g_split_rows : 2 * dev.sm_count / kSplit);
}

template <class C>
cudaError_t launch_quantize_per_token(const void* x, zq_dtype dt, int64_t rows, int64_t k, int8_t* q, float* scale,
                                      cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (k <= 0 || rows > INT32_MAX) return cudaErrorInvalidValue;
  RowLaunch l;
  if (vec_row_launch(rows, k, max_row_threads(dt), {x, q}, &l)) {
    ZQ_DISPATCH_DTYPE(dt, T, ZQ_DISPATCH_ROW(l, return launch_row(
                                                    l, stream, quantize_per_token_vec_kernel<C, T, kRow, kVecs>,
                                                    static_cast<const T*>(x), rows, k, q, scale)));
  }
  const int threads = row_threads(k);
  ZQ_DISPATCH_DTYPE(dt, T, return zq::launch(quantize_per_token_kernel<C, T>, dim3((unsigned)rows), dim3(threads), 0,
                                             stream, static_cast<const T*>(x), k, q, scale));
  return cudaErrorInvalidValue;  // not reached: every dtype case returns
}

}  // namespace zq

ZQ_API void zq_set_row_split(int max_rows) { zq::g_split_rows = max_rows < 0 ? -1 : max_rows; }

ZQ_API cudaError_t zq_quantize_per_token(const void* x, zq_dtype dt, int64_t rows, int64_t k, int8_t* q,
                                         float* scale, cudaStream_t stream) {
  return zq::launch_quantize_per_token<zq::Int8Code>(x, dt, rows, k, q, scale, stream);
}

ZQ_API cudaError_t zq_quantize_per_token_fp8(const void* x, zq_dtype dt, int64_t rows, int64_t k, void* q,
                                             float* scale, cudaStream_t stream) {
  return zq::launch_quantize_per_token<zq::Fp8Code>(x, dt, rows, k, static_cast<int8_t*>(q), scale, stream);
}

ZQ_API cudaError_t zq_quantize_per_tensor(const void* x, zq_dtype dt, int64_t rows, int64_t k,
                                          const float* scale, int8_t* q, float* row_scale, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int64_t n = rows * k;
  const int threads = 256;
  const int64_t want = (n + threads * 4 - 1) / (threads * 4);
  const unsigned blocks = (unsigned)(want < 1 ? 1 : (want > 65535 ? 65535 : want));
  ZQ_DISPATCH_DTYPE(dt, T, return zq::launch(zq::quantize_per_tensor_kernel<T>, dim3(blocks), dim3(threads), 0, stream,
                                             static_cast<const T*>(x), rows, k, scale, q, row_scale));
  return cudaErrorInvalidValue;  // not reached: every dtype case returns
}
