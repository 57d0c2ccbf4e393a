// RoPE and single-token attention for the decode graphs (zq::rope, zq::gqa_attention), where the eager
// forms are launch-bound: a dozen elementwise kernels for the rotary embedding, and repeat_kv copies of the
// whole cache before SDPA. Here each is one launch, the KV heads are read in place (h / group), and the
// cache slots the mask excludes (most of a preallocated cache early in generation) are never loaded.
#include <cooperative_groups.h>

#include "zq/attention.h"
#include "zq/device_math.cuh"
#include "zq/row_vec.cuh"
#include "device_info.h"

namespace zq {

// ---- RoPE: one thread per rotation pair (i, i + d/2) of a head row, q and k rows in one grid -------------
constexpr int kRopeThreads = 256;

struct Strides4 { int64_t v[4]; };  // element strides of a [b, heads, s, d] view

// The cache write of zq_rope_kv: the rotated key rows go to k_cache and the value rows (copied bit for bit) to
// v_cache, at slot slots[pos] of their (batch row, head); a slot outside [0, l) is not written.
template <class T>
struct KvWrite {
  const T* v;
  Strides4 vs;
  T* k_cache;
  Strides4 kcs;
  T* v_cache;
  Strides4 vcs;
  const int64_t* slots;
  int64_t l;
};

// kCache: heads hq .. hq + hkv are the key heads, written to kv.k_cache (not k_out), and hq + hkv .. hq + 2 hkv
// the value heads, copied to kv.v_cache.
template <class T, bool kCache>
__global__ void __launch_bounds__(kRopeThreads)
rope_kernel(const T* __restrict__ q, Strides4 qs, const T* __restrict__ k, Strides4 ks, const T* __restrict__ cos_t,
            const T* __restrict__ sin_t, int64_t hq, int64_t hkv, int64_t s, int64_t d, int64_t pairs,
            T* __restrict__ q_out, T* __restrict__ k_out, KvWrite<T> kv) {
  zq::pdl_begin();
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= pairs) return;
  // idx = ((bi * heads + h) * s + pos) * half + i: consecutive threads walk a row, then its positions,
  // so the contiguous outputs are written in order; heads h >= hq are the key heads (then the value heads).
  const int64_t half = d / 2, heads = hq + (kCache ? 2 : 1) * hkv;
  const int64_t i = idx % half, row = idx / half;
  const int64_t pos = row % s, bh = row / s;
  const int64_t h = bh % heads, bi = bh / heads;
  const int kind = h < hq ? 0 : (h < hq + hkv ? 1 : 2);  // q, k, v
  const int64_t head = kind == 0 ? h : (kind == 1 ? h - hq : h - hq - hkv);
  const Strides4& xs = kind == 0 ? qs : (kind == 1 ? ks : kv.vs);
  const T* x = (kind == 0 ? q : (kind == 1 ? k : kv.v)) + bi * xs.v[0] + head * xs.v[1] + pos * xs.v[2];
  const int64_t sd = xs.v[3];
  T* out;
  int64_t od = 1;
  if (!kCache || kind == 0) {
    out = (kind == 0 ? q_out + (bi * hq + head) * s * d : k_out + (bi * hkv + head) * s * d) + pos * d;
  } else {
    const int64_t slot = kv.slots[pos];
    if (slot < 0 || slot >= kv.l) return;
    const Strides4& cs = kind == 1 ? kv.kcs : kv.vcs;
    out = (kind == 1 ? kv.k_cache : kv.v_cache) + bi * cs.v[0] + head * cs.v[1] + slot * cs.v[2];
    od = cs.v[3];
  }
  if (kCache && kind == 2) {  // values: copied as they are
    out[i * od] = x[i * sd];
    out[(i + half) * od] = x[(i + half) * sd];
    return;
  }
  const int64_t cs = (bi * s + pos) * d;
  const float x0 = to_f<T>(x[i * sd]), x1 = to_f<T>(x[(i + half) * sd]);
  out[i * od] = from_f<T>(x0 * to_f<T>(cos_t[cs + i]) - x1 * to_f<T>(sin_t[cs + i]));
  out[(i + half) * od] = from_f<T>(x1 * to_f<T>(cos_t[cs + i + half]) + x0 * to_f<T>(sin_t[cs + i + half]));
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

// The kAttnUnroll key rows of a lane: slots t0 + u * kSlots + slot of [0, n) (rows k_rows, mask bytes m), each
// loaded (16 bytes at column col) where the mask attends: on[u].
template <class T, int kSlots>
__device__ __forceinline__ void load_keys(const T* k_rows, const uint8_t* m, int64_t t0, int64_t n, int slot,
                                          bool active, int64_t col, int d, Raw<T> (&kr)[kAttnUnroll],
                                          bool (&on)[kAttnUnroll]) {
#pragma unroll
  for (int u = 0; u < kAttnUnroll; ++u) {
    const int64_t t = t0 + u * kSlots + slot;
    on[u] = t < n && m[t] != 0;
    if (on[u] && active) kr[u] = load_raw(k_rows + t * d + col);
  }
}

template <class T, int kLanes>
__global__ void __launch_bounds__(kAttnThreads, kAttnMinBlocks)
decode_attention_kernel(const T* __restrict__ q, int64_t q_sb, int64_t q_sh, const T* __restrict__ k,
                        const T* __restrict__ v, const uint8_t* __restrict__ mask, int hq, int group, int hkv,
                        int64_t l, int d, float scale, T* __restrict__ out) {
  zq::pdl_begin();
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
    load_keys<T, kSlots>(k_row, m_row, t0, l, slot, active, col, d, kr, on);
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

// Lets `kernel` take `dyn` bytes of dynamic shared memory beside its `stat` static bytes: cudaErrorNotSupported
// past the device's opt-in limit.
inline cudaError_t allow_smem(const void* kernel, size_t dyn, size_t stat) {
  if (dyn + stat <= 48 * 1024) return cudaSuccess;
  int dev = 0, optin = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e != cudaSuccess) return e;
  if (dyn + stat > (size_t)optin) return cudaErrorNotSupported;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)dyn);
}

template <class T, int kLanes>
cudaError_t launch_decode_attention(const void* q, int64_t q_sb, int64_t q_sh, const void* k, const void* v,
                                    const uint8_t* mask, int64_t b, int64_t hq, int64_t hkv, int64_t l, int64_t d,
                                    float scale, void* out, cudaStream_t stream) {
  auto kernel = decode_attention_kernel<T, kLanes>;
  const size_t smem = (size_t)l * sizeof(float);
  const cudaError_t e = allow_smem(reinterpret_cast<const void*>(kernel), smem, kAttnStaticSmem);
  if (e != cudaSuccess) return e;
  return zq::launch(kernel, dim3((unsigned)(b * hq)), dim3(kAttnThreads), smem, stream, static_cast<const T*>(q), q_sb,
                    q_sh, static_cast<const T*>(k), static_cast<const T*>(v), mask, (int)hq, (int)(hq / hkv), (int)hkv,
                    l, (int)d, scale, static_cast<T*>(out));
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

// ---- split-L (flash-decoding) decode attention ------------------------------------------------------------
// Grid (split, KV head, batch row): each block takes `chunk` consecutive cache slots of one KV head and every
// query head of its group, so K and V are read once for the group (GQA). Per head it produces the chunk's
// softmax state: max m, sum s = sum_t exp(score_t - m), o = sum_t exp(score_t - m) v_t (fp32, unnormalized).
// With one split the block writes out = o / s itself; otherwise the states go to the workspace and
// combine_kernel merges the splits: M = max_i m_i, out = sum_i e^(m_i - M) o_i / sum_i e^(m_i - M) s_i.
// Lanes and slots as in decode_attention_kernel (kLanes lanes a key row, 16-byte loads, kAttnUnroll rows a
// lane in flight).
//   1. score[g][t] = scale * q_g.k_t for every group head g (q_g in registers for groups of 1-8 heads at head
//      dim 64 / 128, else read from shared memory as fp32), -inf where masked; the key row is loaded once for all g.
//   2. warp w takes heads g = w, w + 4, ...: chunk max, p = exp(score - max) in place, chunk sum.
//   3. V rows are loaded once per pass of kSplitHeads heads; per-slot partitions summed in shared memory in a
//      fixed order (deterministic).
constexpr int kSplitHeads = 4;        // query heads accumulated per pass over V (registers: 4 x 8 floats)
constexpr int kSplitMinChunk = 32;    // slots: below this a split does not pay for its share of the combine
constexpr int kSplitChunkAlign = 16;
constexpr int kSplitMaxChunk = 1024;  // slots a block scores (its fp32 scores of all group heads in shared memory)
constexpr int kCombineThreads = 128;
constexpr size_t kSplitStaticSmem = sizeof(float) * kAttnThreads * kPack * kSplitHeads;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Merging in the cluster (sm_90+): 2..kClusterMaxSplits splits of a (batch row, KV head) run as one thread-block
// cluster and merge their states through distributed shared memory, with no workspace and no combine kernel
// (zq_set_attention_merge: -1 = there, 0 = always the combine kernel, for A/B). 9-16 splits in a non-portable
// cluster of 16 were slower than the combine kernel on the H200 (8B heads, 2-8K caches: 0.65-0.8x at batch 4 and
// 16, bench/results/decode_attention_sweep_c16_H200.md; 8B W8A8 batch 16 at a 4K cache 0.85x): 8 stays the most.
constexpr int64_t kClusterMaxSplits = 8;  // the portable cluster size
static int g_attention_merge = -1;

inline bool merge_in_cluster(int64_t splits) {
  return splits > 1 && splits <= kClusterMaxSplits && g_attention_merge != 0 && sm90_code();
}

// Largest chunk whose scores of `group` heads stay within 32 KB (and kSplitMaxChunk), a multiple of 16.
inline int64_t split_chunk_cap(int64_t group) {
  const int64_t cap = (8192 / group) / kSplitChunkAlign * kSplitChunkAlign;
  return cap < kSplitChunkAlign ? kSplitChunkAlign : (cap > kSplitMaxChunk ? kSplitMaxChunk : cap);
}

// Slots per split for `splits` requested (<= 0: chosen from the SM count); the actual split count is
// ceil(l / chunk). The choice: about two blocks per SM over the (batch, KV head) pairs, splits of >= 32 slots;
// past 512 slots with no more pairs than SMs, as many splits as keep four blocks per SM in one wave, at least 16,
// of >= 64 slots (H200, 8B heads, caches in HBM, bench/results/decode_attention_sweep_H200.md: batch 4 at 2-8K
// slots 1.35-1.42x the two-blocks rule, batch 16 at 4K / 8K 1.40x / 1.24x, batch 1 at 8K 1.17x; 17 splits at
// batch 4, one block a split past the wave, took 81.5 us where 16 took 62.8; batch 64 and caches <= 512 keep the
// two-blocks rule, the fastest there or within 5%). splits = -2: the two-blocks rule alone (A/B).
inline int64_t split_chunk(int64_t b, int64_t hq, int64_t hkv, int64_t l, int64_t splits) {
  if (l <= 0) return kSplitChunkAlign;
  if (splits <= 0) {
    DeviceInfo info;
    const int64_t sms = current_device_info(&info) ? info.sm_count : 132;
    const bool long_cache = splits != -2 && l > kClusterMaxSplits * 2 * kSplitMinChunk && b * hkv <= sms;
    splits = long_cache ? 4 * sms / (b * hkv) : ceil_div(2 * sms, b * hkv);
    if (long_cache && splits < 16) splits = 16;
    const int64_t most = ceil_div(l, long_cache ? 2 * kSplitMinChunk : kSplitMinChunk);
    if (splits > most) splits = most;
    // a cache of <= 8 x 64 slots: at most 8 splits of up to 64, merged in the cluster (one kernel, no combine)
    if (splits > kClusterMaxSplits && l <= kClusterMaxSplits * 2 * kSplitMinChunk && merge_in_cluster(2))
      splits = kClusterMaxSplits;
    if (splits < 1) splits = 1;
  }
  int64_t chunk = ceil_div(ceil_div(l, splits), kSplitChunkAlign) * kSplitChunkAlign;
  const int64_t cap = split_chunk_cap(hq / hkv);
  return chunk > cap ? cap : chunk;
}

inline size_t split_dyn_smem(int64_t group, int64_t chunk, int64_t d) {
  return sizeof(float) * (size_t)(group * (chunk + d + 2)) + (size_t)chunk;  // scores, q, (max, sum) per head, mask
}

struct SplitWorkspace {
  float* m;  // [b * hq][splits]
  float* s;  // [b * hq][splits]
  float* o;  // [b * hq][splits][d]
};

// Bytes of one of the m / s arrays, rounded up to 16 so o starts 16-byte aligned.
inline size_t split_stats_bytes(int64_t rows, int64_t splits) {
  return ((size_t)(rows * splits) * sizeof(float) + 15) / 16 * 16;
}

inline size_t split_workspace_bytes(int64_t rows, int64_t splits, int64_t d) {
  if (splits <= 1 || merge_in_cluster(splits)) return 0;
  return 2 * split_stats_bytes(rows, splits) + (size_t)(rows * splits * d) * sizeof(float);
}

inline SplitWorkspace split_workspace(void* ws, int64_t rows, int64_t splits) {
  const size_t stats = split_stats_bytes(rows, splits);
  char* base = static_cast<char*>(ws);
  return {reinterpret_cast<float*>(base), reinterpret_cast<float*>(base + stats),
          reinterpret_cast<float*>(base + 2 * stats)};
}

// The splits of one (batch row, KV head), a cluster of gridDim.x blocks, each with its heads' states in its own
// shared memory (max m[group], sum s[group], unnormalized output o[group][d]), merged through distributed shared
// memory: block `rank` writes elements rank * blockDim .. (stride splits * blockDim) of the group's outputs, each
// out = sum_i e^(m_i - M) o_i / sum_i e^(m_i - M) s_i over the splits in order (deterministic), M = max_i m_i;
// zeros where no split attended anything. The closing barrier keeps every block's states alive until all have read.
template <class T>
__device__ __forceinline__ void cluster_merge(float* stat_m, float* stat_s, float* o, int group, int d,
                                              T* __restrict__ out_rows) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  const int splits = (int)cluster.num_blocks(), rank = (int)cluster.block_rank();
  for (int e = rank * blockDim.x + threadIdx.x; e < group * d; e += splits * blockDim.x) {
    const int g = e / d;
    float mx = -INFINITY;
    for (int i = 0; i < splits; ++i) mx = fmaxf(mx, cluster.map_shared_rank(stat_m, i)[g]);
    float y = 0.f, sum = 0.f;
    if (mx != -INFINITY) {
      for (int i = 0; i < splits; ++i) {
        const float mi = cluster.map_shared_rank(stat_m, i)[g];
        const float wi = mi == -INFINITY ? 0.f : expf(mi - mx);
        sum += wi * cluster.map_shared_rank(stat_s, i)[g];
        y += wi * cluster.map_shared_rank(o, i)[e];
      }
      y *= 1.f / sum;  // sum >= 1: the split holding the max
    }
    out_rows[e] = from_f<T>(y);
  }
  cluster.sync();
#endif
}

// kG > 0: the group has exactly kG heads and each lane holds its 8 columns of every head's q in registers
// (read from shared memory, 8 scalar loads a head a key row, 4-way bank conflicts, phase 1 was bound by
// shared-memory bandwidth: 0.8 TB/s at batch 16, 2K cache); kG == 0: any group, q read from shared memory.
// in_cluster: the grid's splits are one cluster (merge_in_cluster) and merge there (cluster_merge), the block's
// outputs kept over q's fp32 copy in shared memory.
template <class T, int kLanes, int kG>
__global__ void __launch_bounds__(kAttnThreads, kAttnMinBlocks)
split_attention_kernel(const T* __restrict__ q, int64_t q_sb, int64_t q_sh, const T* __restrict__ k,
                       const T* __restrict__ v, const uint8_t* __restrict__ mask, int hq, int group, int hkv,
                       int64_t l, int d, int64_t chunk, float scale, SplitWorkspace ws, bool in_cluster,
                       T* __restrict__ out) {
  zq::pdl_begin();
  extern __shared__ float dyn[];
  float* score = dyn;                      // [group][chunk]
  float* qs = dyn + group * chunk;         // [group][d], fp32
  float* stat_m = qs + group * d;          // [group]
  float* stat_s = stat_m + group;          // [group]
  uint8_t* msk = reinterpret_cast<uint8_t*>(stat_s + group);  // [chunk]: the chunk's mask bytes
  __shared__ float part[kAttnThreads * kPack * kSplitHeads];  // [slot][head of pass][kLanes * kPack]
  constexpr int kSlots = kAttnThreads / kLanes;
  constexpr int kWarps = kAttnThreads / 32;
  const int64_t split = blockIdx.x, splits = gridDim.x;
  const int kvh = blockIdx.y;
  const int64_t bi = blockIdx.z;
  const int64_t t_begin = split * chunk;
  const int64_t t_end = t_begin + chunk < l ? t_begin + chunk : l;
  const int64_t n = t_end - t_begin;  // >= 1: splits = ceil(l / chunk)
  const int64_t kv_off = (bi * hkv + kvh) * l * d;
  const T* k_row = k + kv_off;
  const T* v_row = v + kv_off;
  const uint8_t* m_row = mask + bi * l;
  const int lane = threadIdx.x % kLanes, slot = threadIdx.x / kLanes;
  const bool active = lane < d / kPack;
  const int64_t col = (int64_t)lane * kPack;

  // q of the group's heads, fp32, in shared memory (kG: also this lane's columns in registers); the mask
  // bytes of the chunk, so the key loads below wait on no global load before them
  for (int e = threadIdx.x; e < group * d / kPack; e += kAttnThreads) {
    const int g = e / (d / kPack), c = (e % (d / kPack)) * kPack;
    float f[kPack];
    load_unpack(q + bi * q_sb + (int64_t)(kvh * group + g) * q_sh + c, f);
#pragma unroll
    for (int i = 0; i < kPack; ++i) qs[g * d + c + i] = f[i];
  }
  for (int64_t t = threadIdx.x; t < n; t += kAttnThreads) msk[t] = m_row[t_begin + t];
  float qr[kG > 0 ? kG : 1][kPack] = {};
  if (kG > 0 && active) {
#pragma unroll
    for (int g = 0; g < kG; ++g) load_unpack(q + bi * q_sb + (int64_t)(kvh * group + g) * q_sh + col, qr[g]);
  }
  __syncthreads();

  // 1. scores
  for (int64_t t0 = 0; t0 < n; t0 += kSlots * kAttnUnroll) {  // uniform trip count: shuffles below are safe
    Raw<T> kr[kAttnUnroll];
    bool on[kAttnUnroll];
    load_keys<T, kSlots>(k_row + t_begin * d, msk, t0, n, slot, active, col, d, kr, on);
#pragma unroll
    for (int u = 0; u < kAttnUnroll; ++u) {
      float kf[kPack] = {};
      if (on[u] && active) unpack<T>(kr[u], kf);
      const int64_t t = t0 + u * kSlots + slot;
      if constexpr (kG > 0) {
        float dot[kG];
#pragma unroll
        for (int g = 0; g < kG; ++g) {
          dot[g] = 0.f;
#pragma unroll
          for (int i = 0; i < kPack; ++i) dot[g] += qr[g][i] * kf[i];
        }
#pragma unroll
        for (int o = kLanes / 2; o > 0; o >>= 1)
#pragma unroll
          for (int g = 0; g < kG; ++g) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], o);
        if (lane == 0 && t < n) {
#pragma unroll
          for (int g = 0; g < kG; ++g) score[g * chunk + t] = on[u] ? dot[g] * scale : -INFINITY;
        }
      } else {
        for (int g = 0; g < group; ++g) {
          float dot = 0.f;
          if (active) {
            const float* qg = qs + g * d + col;
#pragma unroll
            for (int i = 0; i < kPack; ++i) dot += qg[i] * kf[i];
          }
#pragma unroll
          for (int o = kLanes / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
          if (lane == 0 && t < n) score[g * chunk + t] = on[u] ? dot * scale : -INFINITY;
        }
      }
    }
  }
  __syncthreads();

  // 2. per head: chunk max, p_t in place, chunk sum (one warp a head)
  const int warp = threadIdx.x / 32, wl = threadIdx.x % 32;
  for (int g = warp; g < group; g += kWarps) {
    float* sg = score + g * chunk;
    float mx = -INFINITY;
    for (int64_t t = wl; t < n; t += 32) mx = fmaxf(mx, sg[t]);
    mx = warp_max(mx);
    float sum = 0.f;
    for (int64_t t = wl; t < n; t += 32) {
      const float sc = sg[t];
      const float p = sc == -INFINITY ? 0.f : expf(sc - mx);
      sg[t] = p;
      sum += p;
    }
    sum = warp_sum(sum);
    if (wl == 0) {
      stat_m[g] = mx;
      stat_s[g] = sum;
    }
  }
  __syncthreads();

  // 3. o = sum_t p_t v_t, kSplitHeads heads a pass
  for (int g0 = 0; g0 < group; g0 += kSplitHeads) {
    const int heads = group - g0 < kSplitHeads ? group - g0 : kSplitHeads;
    float acc[kSplitHeads][kPack] = {};
    for (int64_t t0 = 0; t0 < n; t0 += kSlots * kAttnUnroll) {
      Raw<T> vr[kAttnUnroll];
      float p[kAttnUnroll][kSplitHeads];
      bool any[kAttnUnroll];
#pragma unroll
      for (int u = 0; u < kAttnUnroll; ++u) {
        const int64_t t = t0 + u * kSlots + slot;
        any[u] = false;
#pragma unroll
        for (int j = 0; j < kSplitHeads; ++j) {
          p[u][j] = (t < n && j < heads) ? score[(g0 + j) * chunk + t] : 0.f;
          any[u] |= p[u][j] != 0.f;
        }
        if (any[u] && active) vr[u] = load_raw(v_row + (t_begin + t) * d + col);
      }
#pragma unroll
      for (int u = 0; u < kAttnUnroll; ++u) {
        if (any[u] && active) {
          float vf[kPack];
          unpack<T>(vr[u], vf);
#pragma unroll
          for (int j = 0; j < kSplitHeads; ++j)
#pragma unroll
            for (int i = 0; i < kPack; ++i) acc[j][i] += p[u][j] * vf[i];
        }
      }
    }
    // part[slot][j][lane * kPack + i]: partition `slot`, head g0 + j, column col + i
#pragma unroll
    for (int j = 0; j < kSplitHeads; ++j)
#pragma unroll
      for (int i = 0; i < kPack; ++i) part[(slot * kSplitHeads + j) * kLanes * kPack + col + i] = acc[j][i];
    __syncthreads();
    for (int e = threadIdx.x; e < heads * d; e += kAttnThreads) {
      const int j = e / d, c = e % d, g = g0 + j;
      float y = 0.f;
      for (int s = 0; s < kSlots; ++s) y += part[(s * kSplitHeads + j) * kLanes * kPack + c];
      const int64_t row = bi * hq + kvh * group + g;
      if (splits == 1) {
        out[row * d + c] = from_f<T>(stat_m[g] == -INFINITY ? 0.f : y / stat_s[g]);
      } else if (in_cluster) {
        qs[g * d + c] = y;  // q's fp32 copy is no longer read (phase 1 is over)
      } else {
        ws.o[(row * splits + split) * d + c] = y;
        if (c == 0) {
          ws.m[row * splits + split] = stat_m[g];
          ws.s[row * splits + split] = stat_s[g];
        }
      }
    }
    __syncthreads();  // part is rewritten by the next pass
  }
  if (in_cluster) cluster_merge(stat_m, stat_s, qs, group, d, out + (bi * hq + (int64_t)kvh * group) * d);
}

// One block per (batch row, query head): merges the splits' states, in split order (deterministic).
template <class T>
__global__ void __launch_bounds__(kCombineThreads)
combine_kernel(SplitWorkspace ws, int64_t splits, int d, T* __restrict__ out) {
  zq::pdl_begin();
  extern __shared__ float w[];  // [splits]: e^(m_i - M)
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const float* m = ws.m + row * splits;
  const float* s = ws.s + row * splits;
  float mx = -INFINITY;
  for (int64_t i = threadIdx.x; i < splits; i += kCombineThreads) mx = fmaxf(mx, m[i]);
  mx = block_max(mx, red, -INFINITY);
  T* o_row = out + row * d;
  if (mx == -INFINITY) {  // nothing attended in any split (uniform across the block)
    for (int e = threadIdx.x; e < d; e += kCombineThreads) o_row[e] = from_f<T>(0.f);
    return;
  }
  float sum = 0.f;
  for (int64_t i = threadIdx.x; i < splits; i += kCombineThreads) {
    const float wi = m[i] == -INFINITY ? 0.f : expf(m[i] - mx);
    w[i] = wi;
    sum += wi * s[i];
  }
  const float inv = 1.f / block_sum(sum, red);  // >= 1: the split holding the max; barriers publish w[]
  const float* o = ws.o + row * splits * d;
  for (int e = threadIdx.x; e < d; e += kCombineThreads) {
    float y = 0.f;
#pragma unroll 8
    for (int64_t i = 0; i < splits; ++i) y += w[i] * o[i * d + e];  // unrolled: the loads overlap (same sum order)
    o_row[e] = from_f<T>(y * inv);
  }
}

template <class T, int kLanes, int kG>
cudaError_t launch_split_attention(const void* q, int64_t q_sb, int64_t q_sh, const void* k, const void* v,
                                   const uint8_t* mask, int64_t b, int64_t hq, int64_t hkv, int64_t l, int64_t d,
                                   float scale, int64_t chunk, void* workspace, void* out, cudaStream_t stream) {
  const int64_t group = hq / hkv, splits = ceil_div(l, chunk);
  auto kernel = split_attention_kernel<T, kLanes, kG>;
  const size_t smem = split_dyn_smem(group, chunk, d);
  cudaError_t e = allow_smem(reinterpret_cast<const void*>(kernel), smem, kSplitStaticSmem);
  if (e != cudaSuccess) return e;
  const bool in_cluster = merge_in_cluster(splits);
  const SplitWorkspace ws = splits > 1 && !in_cluster ? split_workspace(workspace, b * hq, splits) : SplitWorkspace{};
  e = zq::launch_cluster(kernel, dim3((unsigned)splits, (unsigned)hkv, (unsigned)b), dim3(kAttnThreads),
                         dim3(in_cluster ? (unsigned)splits : 1u, 1, 1), smem, stream, static_cast<const T*>(q), q_sb,
                         q_sh, static_cast<const T*>(k), static_cast<const T*>(v), mask, (int)hq, (int)group,
                         (int)hkv, l, (int)d, chunk, scale, ws, in_cluster, static_cast<T*>(out));
  if (e != cudaSuccess || splits == 1 || in_cluster) return e;
  auto comb = combine_kernel<T>;
  const size_t csmem = sizeof(float) * (size_t)splits;
  e = allow_smem(reinterpret_cast<const void*>(comb), csmem, sizeof(float) * 32);
  if (e != cudaSuccess) return e;
  return zq::launch(comb, dim3((unsigned)(b * hq)), dim3(kCombineThreads), csmem, stream, ws, splits, (int)d,
                    static_cast<T*>(out));
}

template <class T>
cudaError_t dispatch_split_lanes(int64_t d8, const void* q, int64_t q_sb, int64_t q_sh, const void* k,
                                 const void* v, const uint8_t* mask, int64_t b, int64_t hq, int64_t hkv, int64_t l,
                                 int64_t d, float scale, int64_t chunk, void* ws, void* out, cudaStream_t stream) {
  // q in registers for the common head dims (64, 128) and groups of 1-8 heads; shared memory otherwise
#define ZQ_SPLIT_GROUP(N, G)                                                                                    \
  if (d8 == N && hq / hkv == G)                                                                                \
    return launch_split_attention<T, N, G>(q, q_sb, q_sh, k, v, mask, b, hq, hkv, l, d, scale, chunk, ws, out, \
                                           stream);
  ZQ_SPLIT_GROUP(8, 1) ZQ_SPLIT_GROUP(8, 2) ZQ_SPLIT_GROUP(8, 4) ZQ_SPLIT_GROUP(8, 8)
  ZQ_SPLIT_GROUP(16, 1) ZQ_SPLIT_GROUP(16, 2) ZQ_SPLIT_GROUP(16, 4) ZQ_SPLIT_GROUP(16, 8)
#undef ZQ_SPLIT_GROUP
#define ZQ_SPLIT_LANES(N)                                                                                       \
  if (d8 <= N) return launch_split_attention<T, N, 0>(q, q_sb, q_sh, k, v, mask, b, hq, hkv, l, d, scale, chunk, \
                                                      ws, out, stream);
  ZQ_SPLIT_LANES(1) ZQ_SPLIT_LANES(2) ZQ_SPLIT_LANES(4) ZQ_SPLIT_LANES(8) ZQ_SPLIT_LANES(16) ZQ_SPLIT_LANES(32)
#undef ZQ_SPLIT_LANES
  return cudaErrorNotSupported;
}

// The shape contract both decode-attention paths share (zq/attention.h).
inline bool decode_shape_ok(const void* q, int64_t q_sb, int64_t q_sh, const void* k, const void* v, int64_t b,
                            int64_t hq, int64_t hkv, int64_t l, int64_t d) {
  return b >= 0 && l >= 0 && hq > 0 && hkv > 0 && hq % hkv == 0 && hq <= INT32_MAX && d > 0 && d % kPack == 0 &&
         d <= 256 && b * hq <= INT32_MAX && aligned16(q) && aligned16(k) && aligned16(v) && q_sb % kPack == 0 &&
         q_sh % kPack == 0;
}

inline Strides4 strides4(const int64_t* st) {
  Strides4 r{};
  for (int i = 0; i < 4; ++i) r.v[i] = st ? st[i] : 0;
  return r;
}

// The shapes zq_rope and zq_rope_kv take (attention.h): d even and <= 512, no negative size.
inline bool rope_shape_ok(int64_t b, int64_t hq, int64_t hkv, int64_t s, int64_t d) {
  return b >= 0 && hq >= 0 && hkv >= 0 && s >= 0 && d > 0 && d % 2 == 0 && d <= 512;
}

template <class T>
cudaError_t launch_rope(const void* q, const int64_t* q_stride, const void* k, const int64_t* k_stride,
                        const void* cos, const void* sin, int64_t b, int64_t hq, int64_t hkv, int64_t s, int64_t d,
                        void* q_out, void* k_out, const KvWrite<T>* kv, cudaStream_t stream) {
  const int64_t pairs = b * s * (hq + (kv ? 2 : 1) * hkv) * (d / 2);
  if (pairs == 0) return cudaSuccess;
  const int64_t blocks = (pairs + kRopeThreads - 1) / kRopeThreads;
  if (blocks > INT32_MAX) return cudaErrorNotSupported;
  const Strides4 qs = strides4(q_stride), ks = strides4(hkv > 0 ? k_stride : nullptr);
  return zq::launch(kv ? rope_kernel<T, true> : rope_kernel<T, false>, dim3((unsigned)blocks), dim3(kRopeThreads), 0,
                    stream, static_cast<const T*>(q), qs, static_cast<const T*>(k), ks, static_cast<const T*>(cos),
                    static_cast<const T*>(sin), hq, hkv, s, d, pairs, static_cast<T*>(q_out),
                    kv ? nullptr : static_cast<T*>(k_out), kv ? *kv : KvWrite<T>{});
}
}  // namespace zq

ZQ_API cudaError_t zq_rope(const void* q, const int64_t* q_stride, const void* k, const int64_t* k_stride,
                           const void* cos, const void* sin, zq_dtype dt, int64_t b, int64_t hq, int64_t hkv,
                           int64_t s, int64_t d, void* q_out, void* k_out, cudaStream_t stream) {
  if (!zq::rope_shape_ok(b, hq, hkv, s, d)) return cudaErrorNotSupported;
  ZQ_DISPATCH_DTYPE(dt, T, return zq::launch_rope<T>(q, q_stride, k, k_stride, cos, sin, b, hq, hkv, s, d, q_out,
                                                     k_out, nullptr, stream));
  return cudaErrorNotSupported;
}

ZQ_API cudaError_t zq_rope_kv(const void* q, const int64_t* q_stride, const void* k, const int64_t* k_stride,
                              const void* v, const int64_t* v_stride, const void* cos, const void* sin, zq_dtype dt,
                              int64_t b, int64_t hq, int64_t hkv, int64_t s, int64_t d, const int64_t* slots,
                              void* k_cache, const int64_t* k_cache_stride, void* v_cache,
                              const int64_t* v_cache_stride, int64_t l, void* q_out, cudaStream_t stream) {
  if (!zq::rope_shape_ok(b, hq, hkv, s, d) || l < 0) return cudaErrorNotSupported;
  if (hkv > 0 && (!k_cache || !v_cache || !slots || !v)) return cudaErrorInvalidValue;
  ZQ_DISPATCH_DTYPE(dt, T, {
    const zq::KvWrite<T> kv{static_cast<const T*>(v), zq::strides4(hkv > 0 ? v_stride : nullptr),
                            static_cast<T*>(k_cache), zq::strides4(hkv > 0 ? k_cache_stride : nullptr),
                            static_cast<T*>(v_cache), zq::strides4(hkv > 0 ? v_cache_stride : nullptr), slots, l};
    return zq::launch_rope<T>(q, q_stride, k, k_stride, cos, sin, b, hq, hkv, s, d, q_out, nullptr, &kv, stream);
  });
  return cudaErrorNotSupported;
}

ZQ_API cudaError_t zq_decode_attention(const void* q, int64_t q_sb, int64_t q_sh, const void* k, const void* v,
                                       const uint8_t* mask, zq_dtype dt, int64_t b, int64_t hq, int64_t hkv,
                                       int64_t l, int64_t d, float scale, void* out, cudaStream_t stream) {
  if (!zq::decode_shape_ok(q, q_sb, q_sh, k, v, b, hq, hkv, l, d)) return cudaErrorNotSupported;
  if (b == 0) return cudaSuccess;
  const int64_t d8 = d / zq::kPack;
  ZQ_DISPATCH_DTYPE(dt, T, return zq::dispatch_lanes<T>(d8, q, q_sb, q_sh, k, v, mask, b, hq, hkv, l, d, scale, out,
                                                        stream));
  return cudaSuccess;
}

ZQ_API int64_t zq_decode_attention_splits(int64_t b, int64_t hq, int64_t hkv, int64_t l, int64_t splits) {
  if (b <= 0 || hq <= 0 || hkv <= 0 || hq % hkv != 0 || l <= 0) return 1;
  return zq::ceil_div(l, zq::split_chunk(b, hq, hkv, l, splits));
}

ZQ_API size_t zq_decode_attention_workspace_bytes(int64_t b, int64_t hq, int64_t hkv, int64_t l, int64_t d,
                                                  int64_t splits) {
  return zq::split_workspace_bytes(b * hq, zq_decode_attention_splits(b, hq, hkv, l, splits), d);
}

ZQ_API cudaError_t zq_decode_attention_split(const void* q, int64_t q_sb, int64_t q_sh, const void* k, const void* v,
                                             const uint8_t* mask, zq_dtype dt, int64_t b, int64_t hq, int64_t hkv,
                                             int64_t l, int64_t d, float scale, int64_t splits, void* workspace,
                                             size_t workspace_bytes, void* out, cudaStream_t stream) {
  if (!zq::decode_shape_ok(q, q_sb, q_sh, k, v, b, hq, hkv, l, d) || b > 65535 || hkv > 65535)
    return cudaErrorNotSupported;
  if (b == 0) return cudaSuccess;
  if (l == 0) {  // no slot at all: every row attends to nothing
    return cudaMemsetAsync(out, 0, (size_t)(b * hq * d) * (dt == ZQ_F32 ? 4 : 2), stream);
  }
  const int64_t chunk = zq::split_chunk(b, hq, hkv, l, splits);
  const int64_t n_splits = zq::ceil_div(l, chunk);
  if (n_splits > INT32_MAX) return cudaErrorNotSupported;
  if (zq::split_workspace_bytes(b * hq, n_splits, d) > workspace_bytes ||
      (n_splits > 1 && !zq::aligned16(workspace)))
    return cudaErrorInvalidValue;
  ZQ_DISPATCH_DTYPE(dt, T, return zq::dispatch_split_lanes<T>(d / zq::kPack, q, q_sb, q_sh, k, v, mask, b, hq, hkv,
                                                              l, d, scale, chunk, workspace, out, stream));
  return cudaErrorNotSupported;
}

ZQ_API void zq_set_attention_merge(int mode) { zq::g_attention_merge = mode < 0 ? -1 : (mode > 0 ? 1 : 0); }
