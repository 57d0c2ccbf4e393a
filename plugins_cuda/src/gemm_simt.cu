// CUDA-core GEMM with the dequantization epilogue fused: one warp per output column, up to MT rows of x per
// warp, dp4a for INT8 x INT8. Decode-sized GEMMs (M <= 16) are bound by reading the weight once, which this
// does with 16-byte loads spread over all SMs; tensor cores would not help there.
#include <type_traits>

#include "zq/device_math.cuh"
#include "zq/gemm.h"
#include "device_info.h"

namespace zq {

__device__ __forceinline__ float load_any(const void* p, int64_t i, zq_dtype dt) {
  switch (dt) {
    case ZQ_F16: return __half2float(static_cast<const __half*>(p)[i]);
    case ZQ_BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}
__device__ __forceinline__ void store_any(void* p, int64_t i, float v, zq_dtype dt) {
  switch (dt) {
    case ZQ_F16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case ZQ_BF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// Weight element k of row n as an integer (INT4 is sign-extended from its nibble).
template <int WBITS>
__device__ __forceinline__ int w_at(const uint8_t* wrow, int64_t k) {
  if constexpr (WBITS == 8) {
    return static_cast<int8_t>(wrow[k]);
  } else {
    const int b = wrow[k >> 1];
    const int nib = (k & 1) ? (b >> 4) : (b & 0xF);
    return nib >= 8 ? nib - 16 : nib;
  }
}

// Two packed INT4 bytes (bits 16p..16p+15 of `word`, low nibble first) -> four int8 (code x u) in one word.
__device__ __forceinline__ uint32_t int4_word(uint32_t word, int p, int u = 1) {
  const uint32_t b0 = (word >> (16 * p)) & 0xFF, b1 = (word >> (16 * p + 8)) & 0xFF;
  const int e0 = ((int)(b0 << 28) >> 28) * u, e1 = ((int)(b0 << 24) >> 28) * u;
  const int e2 = ((int)(b1 << 28) >> 28) * u, e3 = ((int)(b1 << 24) >> 28) * u;
  return (e0 & 0xFF) | ((e1 & 0xFF) << 8) | ((e2 & 0xFF) << 16) | ((uint32_t)(e3 & 0xFF) << 24);
}

// 16 consecutive weights starting at k0 (k0 % 16 == 0) as four words of packed int8.
template <int WBITS>
__device__ __forceinline__ void w_chunk(const uint8_t* wrow, int64_t k0, int (&w)[4]) {
  if constexpr (WBITS == 8) {
    const int4 v = *reinterpret_cast<const int4*>(wrow + k0);
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
  } else {
    const uint2 v = *reinterpret_cast<const uint2*>(wrow + (k0 >> 1));
    const uint32_t words[2] = {v.x, v.y};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int p = 0; p < 2; ++p) w[2 * h + p] = (int)int4_word(words[h], p);
    }
  }
}

__device__ __forceinline__ int dp4a_s8(int a, int b, int c) { return __dp4a(a, b, c); }

template <class XT>
__device__ __forceinline__ float x_at(const XT* x, int64_t i) {
  if constexpr (std::is_same_v<XT, int8_t>) return (float)x[i]; else return to_f<XT>(x[i]);
}

// Warp transpose-reduce of MT per-lane partial sums (MT a power of two <= 32): each halving step a lane
// keeps one half of its values, sends the other half to its partner and adds what it receives, so the MT
// sums cost MT - 1 + log2(32 / MT) shuffles instead of 5 * MT. Afterwards v[0] of lane l is the sum over
// the warp for row `returned` (a bit-reversal of l's low bits); lanes l and l + MT hold the same row.
template <int MT, class T>
__device__ __forceinline__ int reduce_rows(T (&v)[MT], int lane) {
  constexpr int kSteps = MT >= 16 ? 4 : MT >= 8 ? 3 : MT >= 4 ? 2 : MT >= 2 ? 1 : 0;  // log2(MT)
  static_assert((1 << kSteps) == MT, "MT must be a power of two <= 16");
  int row = 0;
#pragma unroll
  for (int bit = 0; bit < kSteps; ++bit) {
    const int w = MT >> bit;
    const bool upper = (lane >> bit) & 1;
#pragma unroll
    for (int i = 0; i < w / 2; ++i) {
      const T send = upper ? v[i] : v[i + w / 2];
      const T keep = upper ? v[i + w / 2] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, 1 << bit);
    }
    row += upper ? w / 2 : 0;
  }
#pragma unroll
  for (int o = MT; o < 32; o <<= 1) v[0] += __shfl_xor_sync(0xffffffffu, v[0], o);
  return row;
}

// MT: rows of x per warp; NW: output columns per warp (each x chunk loaded once, used NW times); XT: int8_t
// (A8) or the float type (A16); KG: K-group scales; VEC: 16-wide chunks (K and group size multiples of 16).
template <int MT, int NW, class XT, int WBITS, bool KG, bool VEC>
__global__ void __launch_bounds__(128) gemm_simt_kernel(zq_gemm_args a) {
  zq::pdl_begin();
  constexpr bool kA8 = std::is_same_v<XT, int8_t>;
  const int lane = threadIdx.x & 31;
  const int64_t n0 = ((int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * NW;
  if (n0 >= a.n) return;
  const int nv = (int)min((int64_t)NW, a.n - n0);
  const int64_t m0 = (int64_t)blockIdx.y * MT;
  const int mv = (int)min((int64_t)MT, a.m - m0);
  const int64_t K = a.k;
  const XT* x = static_cast<const XT*>(a.x) + m0 * K;
  const int64_t wstride = WBITS == 8 ? K : K / 2;
  const uint8_t* w0 = static_cast<const uint8_t*>(a.wq) + n0 * wstride;
  const int64_t gk = K / a.groups;

  // INT8 x INT8 with one scale per row accumulates exactly in int32; everything else in fp32.
  constexpr bool kIntAcc = kA8 && !KG;
  int iacc[MT][NW];
  float facc[MT][NW];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < NW; ++j) { iacc[m][j] = 0; facc[m][j] = 0.f; }

  if constexpr (VEC) {
    for (int64_t k0 = (int64_t)lane * 16; k0 < K; k0 += 32 * 16) {
      int w[NW][4];
      float gs[NW];
#pragma unroll
      for (int j = 0; j < NW; ++j) {
        const int jj = j < nv ? j : 0;  // columns past N re-read column n0 (results discarded)
        w_chunk<WBITS>(w0 + jj * wstride, k0, w[j]);
        gs[j] = KG ? a.w_scale[(n0 + jj) * a.groups + k0 / gk] : 1.f;
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < mv) {
          if constexpr (kA8) {
            const int4 xv = *reinterpret_cast<const int4*>(x + m * K + k0);
#pragma unroll
            for (int j = 0; j < NW; ++j) {
              int s = dp4a_s8(xv.x, w[j][0], 0);
              s = dp4a_s8(xv.y, w[j][1], s);
              s = dp4a_s8(xv.z, w[j][2], s);
              s = dp4a_s8(xv.w, w[j][3], s);
              if constexpr (kIntAcc) iacc[m][j] += s; else facc[m][j] += (float)s * gs[j];
            }
          } else {
            float xf[16];
#pragma unroll
            for (int i = 0; i < 16; ++i) xf[i] = x_at<XT>(x, m * K + k0 + i);
#pragma unroll
            for (int j = 0; j < NW; ++j) {
              float s = 0.f;
#pragma unroll
              for (int i = 0; i < 16; ++i) s += xf[i] * (float)(int)(int8_t)(w[j][i >> 2] >> (8 * (i & 3)));
              facc[m][j] += KG ? s * gs[j] : s;
            }
          }
        }
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) {
#pragma unroll
      for (int j = 0; j < NW; ++j) {
        const int jj = j < nv ? j : 0;
        const int wk = w_at<WBITS>(w0 + jj * wstride, k);
        const float gs = KG ? a.w_scale[(n0 + jj) * a.groups + k / gk] : 1.f;
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < mv) {
            if constexpr (kIntAcc) iacc[m][j] += (int)x[m * K + k] * wk;
            else facc[m][j] += x_at<XT>(x, m * K + k) * (float)wk * gs;
          }
        }
      }
    }
  }

#pragma unroll
  for (int j = 0; j < NW; ++j) {
    if (j >= nv) continue;  // (not break: the loop must unroll so iacc/facc stay in registers)
    const int64_t n = n0 + j;
    const float ws = a.w_scale[n * a.groups];
    using Acc = std::conditional_t<kIntAcc, int, float>;  // INT8 x INT8 row-scaled: exact int32 sums
    Acc part[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if constexpr (kIntAcc) part[m] = iacc[m][j]; else part[m] = facc[m][j];
    }
    const int row = reduce_rows<MT>(part, lane);  // lane now holds the warp's sum for its row
    if (row < mv && lane < MT) {
      const int64_t m = m0 + row;
      float y = KG ? (float)part[0] : (float)part[0] * ws;
      if constexpr (kA8) y *= a.x_scale[m];
      if (a.bias) y += load_any(a.bias, n, a.out_dt);
      y = apply_act(y, a.act);
      if (a.residual) y += load_any(a.residual, m * a.n + n, a.out_dt);
      store_any(a.out, m * a.n + n, y, a.out_dt);
    }
  }
}

template <int MT, int NW, class XT, int WBITS, bool KG>
cudaError_t launch_simt_kernel(const zq_gemm_args& a, bool vec, cudaStream_t stream) {
  constexpr int64_t kColsPerBlock = 4 * NW;
  const dim3 grid((unsigned)((a.n + kColsPerBlock - 1) / kColsPerBlock), (unsigned)((a.m + MT - 1) / MT));
  if (vec) return zq::launch(gemm_simt_kernel<MT, NW, XT, WBITS, KG, true>, grid, dim3(128), 0, stream, a);
  return zq::launch(gemm_simt_kernel<MT, 1, XT, WBITS, KG, false>, dim3((unsigned)((a.n + 3) / 4), grid.y), dim3(128),
                    0, stream, a);
}

// Rows of x per warp (MT) from M; columns per warp (NW, INT8 x only: each x chunk, re-read from L1/L2 by
// every warp, then serves NW weight rows) as many as still leave two blocks per SM: decode-sized GEMMs of
// small models (N ~ 1000) are latency-bound and need the parallelism more than the reuse. The unaligned
// (non-16-wide) and A16 variants keep one column per warp: they are fallbacks, and this bounds compile time.
template <int MT, class XT, int WBITS, bool KG>
cudaError_t launch_simt_nw(const zq_gemm_args& a, bool vec, cudaStream_t stream) {
  constexpr bool kA8 = std::is_same_v<XT, int8_t>;
  if constexpr (kA8 && MT > 1) {
    DeviceInfo dev;
    const int64_t want = 2 * (current_device_info(&dev) ? dev.sm_count : 132);
    const int64_t row_blocks = (a.m + MT - 1) / MT;
    if ((a.n + 15) / 16 * row_blocks >= want) return launch_simt_kernel<MT, 4, XT, WBITS, KG>(a, vec, stream);
    if ((a.n + 7) / 8 * row_blocks >= want) return launch_simt_kernel<MT, 2, XT, WBITS, KG>(a, vec, stream);
  }
  return launch_simt_kernel<MT, 1, XT, WBITS, KG>(a, vec, stream);
}

template <class XT, int WBITS, bool KG>
cudaError_t launch_simt_m(const zq_gemm_args& a, bool vec, cudaStream_t stream) {
  if (a.m <= 1) return launch_simt_kernel<1, 1, XT, WBITS, KG>(a, vec, stream);
  if (a.m <= 4) return launch_simt_nw<4, XT, WBITS, KG>(a, vec, stream);
  if (a.m <= 8) return launch_simt_nw<8, XT, WBITS, KG>(a, vec, stream);
  return launch_simt_nw<16, XT, WBITS, KG>(a, vec, stream);
}

template <class XT, int WBITS>
cudaError_t launch_simt(const zq_gemm_args& a, cudaStream_t stream) {
  const bool kg = a.groups > 1;
  const bool vec = a.k % 16 == 0 && (!kg || (a.k / a.groups) % 16 == 0);
  return kg ? launch_simt_m<XT, WBITS, true>(a, vec, stream) : launch_simt_m<XT, WBITS, false>(a, vec, stream);
}

template <class XT>
cudaError_t launch_simt_w(const zq_gemm_args& a, cudaStream_t stream) {
  return a.w_bits == 4 ? launch_simt<XT, 4>(a, stream) : launch_simt<XT, 8>(a, stream);
}

}  // namespace zq

ZQ_API cudaError_t zq_gemm_simt(const zq_gemm_args* a, cudaStream_t stream) {
  if (a->w_fp8) return cudaErrorNotSupported;  // FP8 codes: zq_gemm_sm90_fp8's
  if (a->m == 0 || a->n == 0) return cudaSuccess;
  if (a->groups <= 0 || a->k % a->groups || (a->w_bits != 8 && a->w_bits != 4) || (a->w_bits == 4 && a->k % 2))
    return cudaErrorInvalidValue;
  if (a->m > (int64_t)65535 * 16) return cudaErrorInvalidValue;
  if (a->x_is_int8) return zq::launch_simt_w<int8_t>(*a, stream);
  switch (a->x_dt) {
    case ZQ_F16: return zq::launch_simt_w<__half>(*a, stream);
    case ZQ_BF16: return zq::launch_simt_w<__nv_bfloat16>(*a, stream);
    default: break;  // fp32 A16: the binding uses the reference implementation
  }
  return cudaErrorInvalidValue;
}

namespace zq {

__global__ void unpack_int4_kernel(const uint8_t* __restrict__ wq, int64_t nbytes, int8_t* __restrict__ out) {
  zq::pdl_begin();
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < nbytes; i += (int64_t)gridDim.x * blockDim.x) {
    const int b = wq[i];
    const int lo = b & 0xF, hi = b >> 4;
    char2 v;
    v.x = (signed char)(lo >= 8 ? lo - 16 : lo);
    v.y = (signed char)(hi >= 8 ? hi - 16 : hi);
    reinterpret_cast<char2*>(out)[i] = v;
  }
}

template <int WBITS>
__global__ void dequantize_weight_kernel(const uint8_t* __restrict__ wq, const float* __restrict__ ws, int64_t groups,
                                         int64_t n, int64_t k, void* out, zq_dtype dt) {
  zq::pdl_begin();
  const int64_t total = n * k, gk = k / groups;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / k, c = i % k;
    const int q = w_at<WBITS>(wq + r * (WBITS == 8 ? k : k / 2), c);
    store_any(out, i, (float)q * ws[r * groups + c / gk], dt);
  }
}

// INT4 codes with two-level K-group scales (zqcompile's qm.two_level_scales: each scale u x the row's base, base =
// max_g scale / 15, exact in fp32) -> int8 code x u (|code x u| <= 105) and the base as the row's scale, so the
// Hopper INT8 GEMM computes the same products. One block a weight row; 16 codes (one group: gk % 16 == 0) a step.
__global__ void unpack_int4_two_level_kernel(const uint8_t* __restrict__ wq, const float* __restrict__ ws,
                                             int64_t groups, int64_t k, int8_t* __restrict__ out,
                                             float* __restrict__ row_scale) {
  zq::pdl_begin();
  __shared__ float red[32];
  const int64_t r = blockIdx.x;
  const float* s = ws + r * groups;
  float m = 0.f;
  for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) m = fmaxf(m, s[g]);
  m = block_max(m, red);
  const float base = __fdiv_rn(m, 15.f);
  if (threadIdx.x == 0) row_scale[r] = base;
  const int64_t gk = k / groups;
  const uint2* src = reinterpret_cast<const uint2*>(wq + r * (k / 2));
  uint4* dst = reinterpret_cast<uint4*>(out + r * k);
  for (int64_t c = threadIdx.x; c < k / 16; c += blockDim.x) {
    const int u = min(max(__float2int_rn(__fdiv_rn(s[c * 16 / gk], base)), 1), 15);
    const uint2 p = src[c];
    dst[c] = make_uint4(int4_word(p.x, 0, u), int4_word(p.x, 1, u), int4_word(p.y, 0, u), int4_word(p.y, 1, u));
  }
}

inline unsigned grid_for(int64_t n) {
  const int64_t b = (n + 255) / 256;
  return (unsigned)(b < 1 ? 1 : (b > 65535 * 4 ? 65535 * 4 : b));
}

}  // namespace zq

ZQ_API cudaError_t zq_unpack_int4(const uint8_t* wq, int64_t n, int64_t k, int8_t* out, cudaStream_t stream) {
  if (n * k == 0) return cudaSuccess;
  if (k % 2) return cudaErrorInvalidValue;
  return zq::launch(zq::unpack_int4_kernel, dim3(zq::grid_for(n * k / 2)), dim3(256), 0, stream, wq, n * k / 2, out);
}

ZQ_API cudaError_t zq_unpack_int4_two_level(const uint8_t* wq, const float* w_scale, int64_t groups, int64_t n,
                                            int64_t k, int8_t* out, float* row_scale, cudaStream_t stream) {
  if (n * k == 0) return cudaSuccess;
  if (groups <= 0 || k % groups || k % 16 || (k / groups) % 16 || n > INT32_MAX) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(wq) % 8 || reinterpret_cast<uintptr_t>(out) % 16) return cudaErrorNotSupported;
  return zq::launch(zq::unpack_int4_two_level_kernel, dim3((unsigned)n), dim3(128), 0, stream, wq, w_scale, groups, k,
                    out, row_scale);
}

ZQ_API cudaError_t zq_dequantize_weight(const void* wq, int w_bits, const float* w_scale, int64_t groups, int64_t n,
                                        int64_t k, void* out, zq_dtype out_dt, cudaStream_t stream) {
  if (n * k == 0) return cudaSuccess;
  if (groups <= 0 || k % groups) return cudaErrorInvalidValue;
  const auto* w = static_cast<const uint8_t*>(wq);
  return zq::launch(w_bits == 4 ? zq::dequantize_weight_kernel<4> : zq::dequantize_weight_kernel<8>,
                    dim3(zq::grid_for(n * k)), dim3(256), 0, stream, w, w_scale, groups, n, k, out, out_dt);
}
