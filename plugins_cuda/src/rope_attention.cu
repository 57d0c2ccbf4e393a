// RoPE and single-token attention for the decode graphs (zq::rope, zq::gqa_attention), where the eager
// forms are launch-bound: a dozen elementwise kernels for the rotary embedding, and repeat_kv copies of the
// whole cache before SDPA. Here each is one launch, the KV heads are read in place (h / group), and the
// cache slots the mask excludes (most of a preallocated cache early in generation) are never loaded.
#include "zq/attention.h"
#include "zq/device_math.cuh"
#include "zq/row_vec.cuh"

namespace zq {

// ---- RoPE: one thread per rotation pair (i, i + d/2) of a head row, q and k rows in one grid -------------
constexpr int kRopeThreads = 256;

struct Strides4 { int64_t v[4]; };  // element strides of a [b, heads, s, d] view

template <class T>
__global__ void __launch_bounds__(kRopeThreads)
rope_kernel(const T* __restrict__ q, Strides4 qs, const T* __restrict__ k, Strides4 ks, const T* __restrict__ cos_t,
            const T* __restrict__ sin_t, int64_t hq, int64_t hkv, int64_t s, int64_t d, int64_t pairs,
            T* __restrict__ q_out, T* __restrict__ k_out) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= pairs) return;
  // idx = ((bi * (hq + hkv) + h) * s + pos) * half + i: consecutive threads walk a row, then its positions,
  // so the contiguous outputs are written in order; heads h >= hq are the key heads.
  const int64_t half = d / 2;
  const int64_t i = idx % half, row = idx / half;
  const int64_t pos = row % s, bh = row / s;
  const int64_t h = bh % (hq + hkv), bi = bh / (hq + hkv);
  const bool is_q = h < hq;
  const int64_t head = is_q ? h : h - hq;
  const T* x = is_q ? q + bi * qs.v[0] + head * qs.v[1] + pos * qs.v[2]
                    : k + bi * ks.v[0] + head * ks.v[1] + pos * ks.v[2];
  const int64_t sd = is_q ? qs.v[3] : ks.v[3];
  T* out = (is_q ? q_out + (bi * hq + head) * s * d : k_out + (bi * hkv + head) * s * d) + pos * d;
  const int64_t cs = (bi * s + pos) * d;
  const float x0 = to_f<T>(x[i * sd]), x1 = to_f<T>(x[(i + half) * sd]);
  out[i] = from_f<T>(x0 * to_f<T>(cos_t[cs + i]) - x1 * to_f<T>(sin_t[cs + i]));
  out[i + half] = from_f<T>(x1 * to_f<T>(cos_t[cs + i + half]) + x0 * to_f<T>(sin_t[cs + i + half]));
}

// ---- decode attention: one block per (batch row, query head) ------------------------------------------------
// kLanes lanes share a key slot (a power of two >= d/8, each holding 8 elements of q: one 16-byte load per
// key row for fp16/bf16), so a warp reads 32/kLanes consecutive rows of k or v: fully coalesced. kAttnUnroll slots
// a lane are loaded before any is used, to keep several loads in flight.
//   1. score[t] = scale * q.k_t (shuffle-reduced over the lanes), -inf where masked; running max.
//   2. block max, p_t = exp(score - max) in place, block sum.
//   3. each thread accumulates p_t v_t over its slot partition for its 8 columns; the partitions are summed
//      in shared memory in a fixed order (deterministic), divided by the sum, rounded once.
constexpr int kAttnThreads = 128;
constexpr int kAttnUnroll = 4;
constexpr size_t kAttnStaticSmem = sizeof(float) * (32 + kAttnThreads * kPack);
constexpr int kAttnMinBlocks = 4;  // per SM: a register budget (128) under which ptxas does not spill

template <class T, int kLanes>
__global__ void __launch_bounds__(kAttnThreads, kAttnMinBlocks)
decode_attention_kernel(const T* __restrict__ q, int64_t q_sb, int64_t q_sh, const T* __restrict__ k,
                        const T* __restrict__ v, const uint8_t* __restrict__ mask, int hq, int group, int hkv,
                        int64_t l, int d, float scale, T* __restrict__ out) {
  extern __shared__ float score[];             // [l]
  __shared__ float red[32];
  __shared__ float part[kAttnThreads * kPack];  // [slot][kLanes * kPack] partial sums of phase 3
  constexpr int kSlots = kAttnThreads / kLanes;
  const int64_t bi = blockIdx.x / hq;
  const int h = blockIdx.x % hq;
  const int64_t kv_off = (bi * hkv + h / group) * l * d;
  const T* k_row = k + kv_off;
  const T* v_row = v + kv_off;
  const uint8_t* m_row = mask + bi * l;
  T* o_row = out + (int64_t)blockIdx.x * d;
  const int lane = threadIdx.x % kLanes, slot = threadIdx.x / kLanes;
  const bool active = lane < d / kPack;  // lanes past the head (d/8 not a power of two) add zeros
  const int64_t col = (int64_t)lane * kPack;

  float qf[kPack] = {};
  if (active) load_unpack(q + bi * q_sb + h * q_sh + col, qf);

  float mx = -INFINITY;
  for (int64_t t0 = 0; t0 < l; t0 += kSlots * kAttnUnroll) {  // uniform trip count: shuffles below are safe
    Raw<T> kr[kAttnUnroll];
    bool on[kAttnUnroll];
#pragma unroll
    for (int u = 0; u < kAttnUnroll; ++u) {
      const int64_t t = t0 + u * kSlots + slot;
      on[u] = t < l && m_row[t] != 0;
      if (on[u] && active) kr[u] = load_raw(k_row + t * d + col);
    }
#pragma unroll
    for (int u = 0; u < kAttnUnroll; ++u) {
      float dot = 0.f;
      if (on[u] && active) {
        float kf[kPack];
        unpack<T>(kr[u], kf);
#pragma unroll
        for (int i = 0; i < kPack; ++i) dot += qf[i] * kf[i];
      }
#pragma unroll
      for (int o = kLanes / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      const int64_t t = t0 + u * kSlots + slot;
      if (on[u]) mx = fmaxf(mx, dot * scale);
      if (lane == 0 && t < l) score[t] = on[u] ? dot * scale : -INFINITY;
    }
  }
  mx = block_max(mx, red, -INFINITY);  // its barriers also publish score[]
  if (mx == -INFINITY) {    // nothing attended (uniform across the block)
    for (int e = threadIdx.x; e < d; e += kAttnThreads) o_row[e] = from_f<T>(0.f);
    return;
  }
  float sum = 0.f;
  for (int64_t t = threadIdx.x; t < l; t += kAttnThreads) {
    const float sc = score[t];
    const float p = sc == -INFINITY ? 0.f : expf(sc - mx);
    score[t] = p;
    sum += p;
  }
  const float inv = 1.f / block_sum(sum, red);  // sum >= 1 (the max slot); barriers publish the p_t

  float acc[kPack] = {};
  for (int64_t t0 = 0; t0 < l; t0 += kSlots * kAttnUnroll) {
    Raw<T> vr[kAttnUnroll];
    float p[kAttnUnroll];
#pragma unroll
    for (int u = 0; u < kAttnUnroll; ++u) {
      const int64_t t = t0 + u * kSlots + slot;
      p[u] = t < l ? score[t] : 0.f;
      if (p[u] != 0.f && active) vr[u] = load_raw(v_row + t * d + col);
    }
#pragma unroll
    for (int u = 0; u < kAttnUnroll; ++u) {
      if (p[u] != 0.f && active) {
        float vf[kPack];
        unpack<T>(vr[u], vf);
#pragma unroll
        for (int i = 0; i < kPack; ++i) acc[i] += p[u] * vf[i];
      }
    }
  }
  // threadIdx.x * kPack == slot * (kLanes * kPack) + col: partition `slot`, columns col .. col + 7
#pragma unroll
  for (int i = 0; i < kPack; ++i) part[threadIdx.x * kPack + i] = acc[i];
  __syncthreads();
  for (int e = threadIdx.x; e < d; e += kAttnThreads) {
    float y = 0.f;
    for (int s = 0; s < kSlots; ++s) y += part[s * kLanes * kPack + e];
    o_row[e] = from_f<T>(y * inv);
  }
}

template <class T, int kLanes>
cudaError_t launch_decode_attention(const void* q, int64_t q_sb, int64_t q_sh, const void* k, const void* v,
                                    const uint8_t* mask, int64_t b, int64_t hq, int64_t hkv, int64_t l, int64_t d,
                                    float scale, void* out, cudaStream_t stream) {
  auto kernel = decode_attention_kernel<T, kLanes>;
  const size_t smem = (size_t)l * sizeof(float);
  if (smem + kAttnStaticSmem > 48 * 1024) {
    int dev = 0, optin = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (e != cudaSuccess) return e;
    if (smem + kAttnStaticSmem > (size_t)optin) return cudaErrorNotSupported;
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  kernel<<<(unsigned)(b * hq), kAttnThreads, smem, stream>>>(
      static_cast<const T*>(q), q_sb, q_sh, static_cast<const T*>(k), static_cast<const T*>(v), mask, (int)hq,
      (int)(hq / hkv), (int)hkv, l, (int)d, scale, static_cast<T*>(out));
  return cudaGetLastError();
}

template <class T>
cudaError_t dispatch_lanes(int64_t d8, const void* q, int64_t q_sb, int64_t q_sh, const void* k, const void* v,
                           const uint8_t* mask, int64_t b, int64_t hq, int64_t hkv, int64_t l, int64_t d,
                           float scale, void* out, cudaStream_t stream) {
#define ZQ_ATTN_LANES(N)                                                                                      \
  if (d8 <= N) return launch_decode_attention<T, N>(q, q_sb, q_sh, k, v, mask, b, hq, hkv, l, d, scale, out, \
                                                    stream);
  ZQ_ATTN_LANES(1) ZQ_ATTN_LANES(2) ZQ_ATTN_LANES(4) ZQ_ATTN_LANES(8) ZQ_ATTN_LANES(16) ZQ_ATTN_LANES(32)
#undef ZQ_ATTN_LANES
  return cudaErrorNotSupported;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace zq

ZQ_API cudaError_t zq_rope(const void* q, const int64_t* q_stride, const void* k, const int64_t* k_stride,
                           const void* cos, const void* sin, zq_dtype dt, int64_t b, int64_t hq, int64_t hkv,
                           int64_t s, int64_t d, void* q_out, void* k_out, cudaStream_t stream) {
  if (b < 0 || hq < 0 || hkv < 0 || s < 0 || d <= 0 || d % 2 != 0 || d > 512) return cudaErrorNotSupported;
  const int64_t pairs = b * s * (hq + hkv) * (d / 2);
  if (pairs == 0) return cudaSuccess;
  const int64_t blocks = (pairs + zq::kRopeThreads - 1) / zq::kRopeThreads;
  if (blocks > INT32_MAX) return cudaErrorNotSupported;
  zq::Strides4 qs{}, ks{};
  for (int i = 0; i < 4; ++i) {
    qs.v[i] = q_stride[i];
    ks.v[i] = hkv > 0 ? k_stride[i] : 0;
  }
  ZQ_DISPATCH_DTYPE(dt, T, zq::rope_kernel<T><<<(unsigned)blocks, zq::kRopeThreads, 0, stream>>>(
                               static_cast<const T*>(q), qs, static_cast<const T*>(k), ks,
                               static_cast<const T*>(cos), static_cast<const T*>(sin), hq, hkv, s, d, pairs,
                               static_cast<T*>(q_out), static_cast<T*>(k_out)));
  return cudaGetLastError();
}

ZQ_API cudaError_t zq_decode_attention(const void* q, int64_t q_sb, int64_t q_sh, const void* k, const void* v,
                                       const uint8_t* mask, zq_dtype dt, int64_t b, int64_t hq, int64_t hkv,
                                       int64_t l, int64_t d, float scale, void* out, cudaStream_t stream) {
  if (b < 0 || l < 0 || hq <= 0 || hkv <= 0 || hq % hkv != 0 || hq > INT32_MAX || d <= 0 || d % zq::kPack != 0 ||
      d > 256 || b * hq > INT32_MAX)
    return cudaErrorNotSupported;
  if (!zq::aligned16(q) || !zq::aligned16(k) || !zq::aligned16(v) || q_sb % zq::kPack != 0 ||
      q_sh % zq::kPack != 0)
    return cudaErrorNotSupported;
  if (b == 0) return cudaSuccess;
  const int64_t d8 = d / zq::kPack;
  ZQ_DISPATCH_DTYPE(dt, T, return zq::dispatch_lanes<T>(d8, q, q_sb, q_sh, k, v, mask, b, hq, hkv, l, d, scale, out,
                                                        stream));
  return cudaSuccess;
}
