// LayerNorm / RMSNorm with the token-wise quantization fused (ZeroQuant Sec. 4.3: quantization is fused
// into the producer of a GEMM input). Intermediates are rounded to the model dtype exactly where the torch
// reference materialises them, so the codes (INT8, or FP8 E4M3 from zq_norm_quant_fp8) match it up to ties. The
// vector path (zq/row_vec.cuh) keeps the row in registers; the scalar kernel (row cached in shared memory) takes
// the other shapes and pointers.
#include "zq/device_math.cuh"
#include "zq/norm_affine.cuh"
#include "zq/norm_quant.h"
#include "zq/row_vec.cuh"

namespace zq {

template <class C, class T, bool kRms>
__global__ void norm_quant_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                  const T* __restrict__ weight, const T* __restrict__ bias, int64_t k, float eps,
                                  int8_t* __restrict__ q, float* __restrict__ scale, T* __restrict__ out,
                                  T* __restrict__ hsum) {
  zq::pdl_begin();
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
    const float b = (!kRms && bias) ? to_f<T>(bias[i]) : 0.f;
    const float y = norm_affine<T, kRms>(row[i], mean, rstd, to_f<T>(weight[i]), b, bias != nullptr);
    row[i] = y;
    if (out) out[off + i] = from_f<T>(y);
    amax = fmaxf(amax, fabsf(y));
  }
  amax = fmaxf(block_max(amax, red), kEps);
  const float inv = code_inv<C>(amax);
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) q[off + i] = C::encode(row[i], inv);
  if (threadIdx.x == 0) scale[blockIdx.x] = amax / C::kMax;
}

template <class C, class T, bool kRms, int kRow, int kVecs>
__global__ void __launch_bounds__(row_block_threads<T, kRow>())
norm_quant_vec_kernel(const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ weight,
                      const T* __restrict__ bias, int64_t rows, int64_t k, float eps, int8_t* __restrict__ q,
                      float* __restrict__ scale, T* __restrict__ out, T* __restrict__ hsum) {
  zq::pdl_begin();
  __shared__ float red[32];
  const RowPos p = row_pos<kRow>();
  if (p.row >= rows) return;  // a whole warp (warp rows); never taken with block or split rows
  const int64_t off = p.row * k;
  const int k8 = (int)(k / kPack);
  Raw<T> hv[kVecs], wv[kVecs];  // x (+ residual), then the normalised output, rounded to T; the weight
  load_held_row(x + off, p, k8, hv);
  // split rows (one pack a thread, latency-bound): the weight's load in flight with x's, not after the sums
  if constexpr (kRow == kSplitRow) load_held_row(weight, p, k8, wv);
  if (residual) {
    Raw<T> rv[kVecs];
    load_held_row(residual + off, p, k8, rv);
#pragma unroll
    for (int v = 0; v < kVecs; ++v) {
      const int j = p.t + v * p.nthr;
      if (j < k8) {
        hv[v] = add_raw<T>(hv[v], rv[v]);
        if (hsum) store_raw(hsum + off + (int64_t)j * kPack, hv[v]);
      }
    }
  }
  float sum = 0.f;
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    if (p.t + v * p.nthr < k8) {
      float h[kPack];
      unpack<T>(hv[v], h);
#pragma unroll
      for (int i = 0; i < kPack; ++i) sum += kRms ? h[i] * h[i] : h[i];
    }
  }
  sum = row_sum<kRow>(sum, red);
  float mean = 0.f, rstd;
  if constexpr (kRms) {
    rstd = rsqrtf(sum / (float)k + eps);
  } else {
    mean = sum / (float)k;
    float var = 0.f;  // second pass over the held row: exact for rows with large offsets (outliers)
#pragma unroll
    for (int v = 0; v < kVecs; ++v) {
      if (p.t + v * p.nthr < k8) {
        float h[kPack];
        unpack<T>(hv[v], h);
#pragma unroll
        for (int i = 0; i < kPack; ++i) {
          const float d = h[i] - mean;
          var += d * d;
        }
      }
    }
    var = row_sum<kRow>(var, red);
    rstd = rsqrtf(var / (float)k + eps);
  }
  float amax = 0.f;
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const int j = p.t + v * p.nthr;
    if (j < k8) {
      float h[kPack], w[kPack], y[kPack];
      unpack<T>(hv[v], h);
      if constexpr (kRow == kSplitRow) unpack<T>(wv[v], w); else load_unpack(weight + (int64_t)j * kPack, w);
      if (!kRms && bias) {
        float b[kPack];
        load_unpack(bias + (int64_t)j * kPack, b);
#pragma unroll
        for (int i = 0; i < kPack; ++i) y[i] = norm_affine<T, kRms, false>(h[i], mean, rstd, w[i], b[i], true);
      } else {
#pragma unroll
        for (int i = 0; i < kPack; ++i) y[i] = norm_affine<T, kRms, false>(h[i], mean, rstd, w[i], 0.f, false);
      }
      hv[v] = pack<T>(y);
      if (out) store_raw(out + off + (int64_t)j * kPack, hv[v]);
      amax = abs_max_raw<T>(amax, hv[v]);
    }
  }
  quantize_held_row<C, T, kVecs, kRow>(hv, amax, p, k8, q + off, scale, red);
}

template <class C, class T, bool kRms>
cudaError_t launch_norm_quant(const void* x, const void* residual, const void* weight, const void* bias,
                              int64_t rows, int64_t k, float eps, int8_t* q, float* scale, void* out, void* hsum,
                              cudaStream_t stream) {
  RowLaunch l;
  if (vec_row_launch(rows, k, zq::max_row_threads<T>(), {x, residual, weight, bias, q, out, hsum}, &l)) {
    ZQ_DISPATCH_ROW(l, return launch_row(l, stream, norm_quant_vec_kernel<C, T, kRms, kRow, kVecs>,
                                         static_cast<const T*>(x), static_cast<const T*>(residual),
                                         static_cast<const T*>(weight), static_cast<const T*>(bias), rows, k, eps,
                                         q, scale, static_cast<T*>(out), static_cast<T*>(hsum)));
  }
  const size_t smem = (size_t)k * sizeof(float);
  auto kernel = norm_quant_kernel<C, T, kRms>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  return zq::launch(kernel, dim3((unsigned)rows), dim3(row_threads(k)), smem, stream, static_cast<const T*>(x),
                    static_cast<const T*>(residual), static_cast<const T*>(weight), static_cast<const T*>(bias), k, eps,
                    q, scale, static_cast<T*>(out), static_cast<T*>(hsum));
}

template <class C>
cudaError_t norm_quant_codes(const void* x, const void* residual, const void* weight, const void* bias, zq_dtype dt,
                             int64_t rows, int64_t k, float eps, int is_rms, int8_t* q, float* scale, void* out,
                             void* hsum, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (k <= 0 || k > 56 * 1024 || rows > INT32_MAX || weight == nullptr) return cudaErrorInvalidValue;
  ZQ_DISPATCH_DTYPE(dt, T,
                    return is_rms ? launch_norm_quant<C, T, true>(x, residual, weight, nullptr, rows, k, eps, q,
                                                                  scale, out, hsum, stream)
                                  : launch_norm_quant<C, T, false>(x, residual, weight, bias, rows, k, eps, q,
                                                                   scale, out, hsum, stream));
  return cudaSuccess;
}

}  // namespace zq

ZQ_API cudaError_t zq_norm_quant(const void* x, const void* residual, const void* weight, const void* bias,
                                 zq_dtype dt, int64_t rows, int64_t k, float eps, int is_rms, int8_t* q,
                                 float* scale, void* out, void* hsum, cudaStream_t stream) {
  return zq::norm_quant_codes<zq::Int8Code>(x, residual, weight, bias, dt, rows, k, eps, is_rms, q, scale, out,
                                            hsum, stream);
}

ZQ_API cudaError_t zq_norm_quant_fp8(const void* x, const void* residual, const void* weight, const void* bias,
                                     zq_dtype dt, int64_t rows, int64_t k, float eps, int is_rms, void* q,
                                     float* scale, void* out, void* hsum, cudaStream_t stream) {
  return zq::norm_quant_codes<zq::Fp8Code>(x, residual, weight, bias, dt, rows, k, eps, is_rms,
                                           static_cast<int8_t*>(q), scale, out, hsum, stream);
}
