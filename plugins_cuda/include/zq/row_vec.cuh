// Building blocks of the vectorized per-token (row) kernels: the row is read from global memory once, in
// packs of 8 elements (one 16-byte access for fp16/bf16, two for fp32), and held in registers as those raw
// packs until the int8 codes are written. Short rows (K <= 1024) take one warp each (several rows per block,
// shuffle-only reductions); long rows take a whole block; on Hopper, when there are few long rows (decode: one
// to a few dozen tokens), each row is split over a cluster of kSplit blocks (reductions through distributed
// shared memory), so one row is read by kSplit SMs instead of one. Only K % 8 == 0 with 16-byte aligned
// pointers and K <= 32768 (fp32: 16384; split rows: 57344) qualify; everything else runs the scalar kernels
// (row cached in shared memory).
// Holding raw packs (not fp32) is exact: every value kept is already rounded to the model dtype.
#pragma once
#include <stdint.h>
#include <initializer_list>
#include <utility>
#include "zq/device_math.cuh"
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>
#define ZQ_ROW_CLUSTERS 1
#endif

namespace zq {

constexpr int kPack = 8;              // elements per pack
constexpr int kMaxVecs = 4;           // packs per thread
constexpr int kWarpRowsPerBlock = 4;  // rows per block when a warp takes a row
constexpr int kSplit = 8;             // blocks (one cluster) per row on the split layout
// How a row kernel lays rows over threads (the kernels' template parameter kRow).
enum RowLayout : int { kBlockRow = 0, kWarpRow = 1, kSplitRow = 2 };
// Threads of a block row: 1024 at most (64 registers a thread), 512 for fp32 (its packs take twice the registers).
template <class T> constexpr int max_row_threads() { return sizeof(T) == 4 ? 512 : 1024; }
inline int max_row_threads(zq_dtype dt) { return dt == ZQ_F32 ? 512 : 1024; }
template <class T, int kRow> constexpr int row_block_threads() {
  return kRow == kWarpRow ? 32 * kWarpRowsPerBlock : max_row_threads<T>();
}

template <class T> struct Raw { uint4 w[sizeof(T) / 2]; };  // 8 elements of T

template <class T> __device__ __forceinline__ Raw<T> load_raw(const T* p) {
  Raw<T> r;
#pragma unroll
  for (int i = 0; i < (int)(sizeof(T) / 2); ++i) r.w[i] = reinterpret_cast<const uint4*>(p)[i];
  return r;
}
template <class T> __device__ __forceinline__ void store_raw(T* p, const Raw<T>& r) {
#pragma unroll
  for (int i = 0; i < (int)(sizeof(T) / 2); ++i) reinterpret_cast<uint4*>(p)[i] = r.w[i];
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
__device__ __forceinline__ uint4 make_words(const uint32_t (&u)[4]) { return make_uint4(u[0], u[1], u[2], u[3]); }

// Pack <-> 8 floats. The conversions are exact (to fp32) or round-to-nearest-even (from fp32), the same as
// to_f / from_f element by element.
template <class T> __device__ __forceinline__ void unpack(const Raw<T>& r, float (&f)[kPack]);
template <class T> __device__ __forceinline__ Raw<T> pack(const float (&f)[kPack]);

template <> __device__ __forceinline__ void unpack<float>(const Raw<float>& r, float (&f)[kPack]) {
#pragma unroll
  for (int i = 0; i < kPack; ++i) f[i] = __uint_as_float(word(r.w[i / 4], i % 4));
}
template <> __device__ __forceinline__ Raw<float> pack<float>(const float (&f)[kPack]) {
  Raw<float> r;
  r.w[0] = make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  r.w[1] = make_uint4(__float_as_uint(f[4]), __float_as_uint(f[5]), __float_as_uint(f[6]), __float_as_uint(f[7]));
  return r;
}
template <> __device__ __forceinline__ void unpack<__half>(const Raw<__half>& r, float (&f)[kPack]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t u = word(r.w[0], i);
    const float2 p = __half22float2(*reinterpret_cast<const __half2*>(&u));
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}
template <> __device__ __forceinline__ Raw<__half> pack<__half>(const float (&f)[kPack]) {
  uint32_t u[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __half2 h = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
    u[i] = *reinterpret_cast<const uint32_t*>(&h);
  }
  return Raw<__half>{{make_words(u)}};
}
template <> __device__ __forceinline__ void unpack<__nv_bfloat16>(const Raw<__nv_bfloat16>& r, float (&f)[kPack]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t u = word(r.w[0], i);
    const float2 p = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u));
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}
template <> __device__ __forceinline__ Raw<__nv_bfloat16> pack<__nv_bfloat16>(const float (&f)[kPack]) {
  uint32_t u[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    u[i] = *reinterpret_cast<const uint32_t*>(&h);
  }
  return Raw<__nv_bfloat16>{{make_words(u)}};
}

template <class T> __device__ __forceinline__ Raw<T> load_unpack(const T* p, float (&f)[kPack]) {
  const Raw<T> r = load_raw(p);
  unpack<T>(r, f);
  return r;
}

// 8 codes (C::encode4: Int8Code or Fp8Code) in one 8-byte store; the values' row amax set `inv`.
template <class C> __device__ __forceinline__ void store_q8(int8_t* p, const float (&f)[kPack], float inv) {
  *reinterpret_cast<uint2*>(p) = make_uint2(C::encode4(f[0], f[1], f[2], f[3], inv),
                                            C::encode4(f[4], f[5], f[6], f[7], inv));
}

// Packs added / multiplied element by element in T, rounded once to T as the reference does (fp32 math, then
// the model dtype). fp16 / bf16 add and fp16 multiply run packed (HADD2 / HMUL2): the same bits, since fp32's 24
// bits are >= 2p + 2 for p = 11 (fp16) and 8 (bf16), so rounding the fp32 sum to T equals rounding the exact sum,
// and an fp16 x fp16 product is exact in fp32. bf16 multiply (products can fall below fp32's normal range) and
// fp32 take the fp32 path.
template <class T> __device__ __forceinline__ Raw<T> add_raw(const Raw<T>& a, const Raw<T>& b) {
  float fa[kPack], fb[kPack];
  unpack<T>(a, fa);
  unpack<T>(b, fb);
#pragma unroll
  for (int i = 0; i < kPack; ++i) fa[i] += fb[i];
  return pack<T>(fa);
}
template <class T> __device__ __forceinline__ Raw<T> mul_raw(const Raw<T>& a, const Raw<T>& b) {
  float fa[kPack], fb[kPack];
  unpack<T>(a, fa);
  unpack<T>(b, fb);
#pragma unroll
  for (int i = 0; i < kPack; ++i) fa[i] *= fb[i];
  return pack<T>(fa);
}
template <class T2, class T, class Op> __device__ __forceinline__ Raw<T> map2_raw(const Raw<T>& a, const Raw<T>& b,
                                                                                 Op op) {
  uint32_t u[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t x = word(a.w[0], i), y = word(b.w[0], i);
    const T2 r = op(*reinterpret_cast<const T2*>(&x), *reinterpret_cast<const T2*>(&y));
    u[i] = *reinterpret_cast<const uint32_t*>(&r);
  }
  return Raw<T>{{make_words(u)}};
}
template <> __device__ __forceinline__ Raw<__half> add_raw<__half>(const Raw<__half>& a, const Raw<__half>& b) {
  return map2_raw<__half2>(a, b, [](__half2 x, __half2 y) { return __hadd2(x, y); });
}
template <> __device__ __forceinline__ Raw<__half> mul_raw<__half>(const Raw<__half>& a, const Raw<__half>& b) {
  return map2_raw<__half2>(a, b, [](__half2 x, __half2 y) { return __hmul2(x, y); });
}
template <> __device__ __forceinline__ Raw<__nv_bfloat16> add_raw<__nv_bfloat16>(const Raw<__nv_bfloat16>& a,
                                                                                 const Raw<__nv_bfloat16>& b) {
  return map2_raw<__nv_bfloat162>(a, b, [](__nv_bfloat162 x, __nv_bfloat162 y) { return __hadd2(x, y); });
}

// max(m, |v|) over a pack's values, NaN dropped as fmaxf drops it (packed HMNMX2 for fp16 / bf16).
template <class T> __device__ __forceinline__ float abs_max_raw(float m, const Raw<T>& r) {
  float f[kPack];
  unpack<T>(r, f);
#pragma unroll
  for (int i = 0; i < kPack; ++i) m = fmaxf(m, fabsf(f[i]));
  return m;
}
template <class T2> __device__ __forceinline__ float abs_max_words(float m, const uint4& w) {
  T2 acc = __habs2(*reinterpret_cast<const T2*>(&w.x));
  const uint32_t rest[3] = {w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 3; ++i) acc = __hmax2(acc, __habs2(*reinterpret_cast<const T2*>(&rest[i])));
  return fmaxf(m, fmaxf(__low2float(acc), __high2float(acc)));
}
template <> __device__ __forceinline__ float abs_max_raw<__half>(float m, const Raw<__half>& r) {
  return abs_max_words<__half2>(m, r.w[0]);
}
template <> __device__ __forceinline__ float abs_max_raw<__nv_bfloat16>(float m, const Raw<__nv_bfloat16>& r) {
  return abs_max_words<__nv_bfloat162>(m, r.w[0]);
}

// Where a thread sits: its row, its index within the row's threads, and how many threads share the row.
struct RowPos { int64_t row; int t; int nthr; };
template <int kRow> __device__ __forceinline__ RowPos row_pos() {
  if constexpr (kRow == kWarpRow)
    return {(int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), (int)(threadIdx.x & 31), 32};
  else if constexpr (kRow == kSplitRow)  // grid (kSplit, rows), one cluster a row: block x holds its x-th part
    return {(int64_t)blockIdx.y, (int)(blockIdx.x * blockDim.x + threadIdx.x), (int)(gridDim.x * blockDim.x)};
  else
    return {(int64_t)blockIdx.x, (int)threadIdx.x, (int)blockDim.x};
}

// A split row's reduction: the block's value, then the cluster's, every block adding the parts in rank order
// (the same float result in all of them). Two cluster barriers: parts written before any is read, all read
// before any block moves on (to overwrite its part in the next reduction, or to exit).
template <bool kMax> __device__ __forceinline__ float split_reduce(float v, float* red) {
  v = kMax ? block_max(v, red) : block_sum(v, red);
#ifdef ZQ_ROW_CLUSTERS
  __shared__ float part;
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  if (threadIdx.x == 0) part = v;
  cluster.sync();
  float acc = 0.f;
  for (unsigned b = 0; b < cluster.num_blocks(); ++b) {
    const float pb = *cluster.map_shared_rank(&part, b);
    acc = kMax ? fmaxf(acc, pb) : acc + pb;
  }
  cluster.sync();
  return acc;
#else
  return v;  // not compiled for sm_90: the host never launches the split layout there (split_rows: sm90_code)
#endif
}
template <int kRow> __device__ __forceinline__ float row_sum(float v, float* red) {
  if constexpr (kRow == kWarpRow) return warp_sum(v);
  else if constexpr (kRow == kSplitRow) return split_reduce<false>(v, red);
  else return block_sum(v, red);
}
template <int kRow> __device__ __forceinline__ float row_max(float v, float* red) {
  if constexpr (kRow == kWarpRow) return warp_max(v);
  else if constexpr (kRow == kSplitRow) return split_reduce<true>(v, red);
  else return block_max(v, red);
}

// Host: the vector path's launch geometry, or false when the row kernel must take the scalar path. `blocks`
// is the grid's x (rows for split rows, whose grid is (kSplit, rows) in clusters of kSplit).
struct RowLaunch { int layout; int vecs; int threads; unsigned blocks; };

// Whether `rows` long rows are split over clusters on the current device (zq_set_row_split: -1 = the library's
// choice: for kernels that pass `by_default` (measured faster split), rows * kSplit at most twice the SM count
// on sm_90+; 0 = never; n = up to n rows on sm_90+, every row kernel).
bool split_rows(int64_t rows, bool by_default);

// Launch a row kernel with a RowLaunch's geometry (clusters of kSplit blocks for split rows).
template <class... KArgs, class... Args>
cudaError_t launch_row(const RowLaunch& l, cudaStream_t stream, void (*kernel)(KArgs...), Args&&... args) {
  if (l.layout != kSplitRow)
    return zq::launch(kernel, dim3(l.blocks), dim3(l.threads), 0, stream, std::forward<Args>(args)...);
  return zq::launch_cluster(kernel, dim3(kSplit, l.blocks, 1), dim3(l.threads), dim3(kSplit, 1, 1), 0, stream,
                            std::forward<Args>(args)...);
}
// `split_by_default`: the kernel takes the split layout at the library's choice (zq_set_row_split(-1)); H200,
// fp16, K = 4096 / 14336, M = 1-33 (bench/results/elementwise_decode_NVIDIA_H200.md): act_quant (gate) 1.5-1.7x
// faster split; norm_quant 0.74-0.97x and quantize_per_token 0.70-0.91x (the two cluster barriers cost more
// than one block's loads there), so those two split only when forced.
inline bool vec_row_launch(int64_t rows, int64_t k, int max_threads, std::initializer_list<const void*> ptrs,
                           RowLaunch* l, bool split_by_default = false) {
  if (k % kPack != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && (reinterpret_cast<uintptr_t>(p) & 15u) != 0) return false;
  const int64_t k8 = k / kPack;
  if (k8 <= 32 * kMaxVecs) {
    l->layout = kWarpRow;
    l->threads = 32 * kWarpRowsPerBlock;
    l->vecs = (int)((k8 + 31) / 32);
    l->blocks = (unsigned)((rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock);
    return true;
  }
  if (k8 <= (int64_t)kSplit * max_threads && split_rows(rows, split_by_default)) {
    l->layout = kSplitRow;  // one pack a thread, the row's packs over kSplit blocks
    l->vecs = 1;
    l->threads = (int)((k8 + kSplit * 32 - 1) / (kSplit * 32) * 32);
    l->blocks = (unsigned)rows;
    return true;
  }
  if (k8 > (int64_t)max_threads * kMaxVecs) return false;
  int threads = 128;
  while ((int64_t)threads * kMaxVecs < k8) threads *= 2;
  l->layout = kBlockRow;
  l->threads = threads;
  l->vecs = (int)((k8 + threads - 1) / threads);
  l->blocks = (unsigned)rows;
  return true;
}


// This thread's packs of a row (`row` points at the row's first element): pack v is element pack
// p.t + v * p.nthr; packs past the row's k8 are left unset (every loop over held packs checks j < k8).
template <class T, int kVecs>
__device__ __forceinline__ void load_held_row(const T* __restrict__ row, const RowPos& p, int k8, Raw<T> (&hv)[kVecs]) {
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const int j = p.t + v * p.nthr;
    if (j < k8) hv[v] = load_raw(row + (int64_t)j * kPack);
  }
}

// The end of every per-token kernel (quant_math.quantize_per_token / quantize_per_token_fp8): the row's amax
// from each thread's part, then the codes (C: Int8Code or Fp8Code) of the packs the thread holds and, once per
// row, the scale.
template <class C, class T, int kVecs, int kRow>
__device__ __forceinline__ void quantize_held_row(const Raw<T> (&held)[kVecs], float amax, const RowPos& p, int k8,
                                                  int8_t* q_row, float* scale, float* red) {
  amax = fmaxf(row_max<kRow>(amax, red), kEps);
  const float inv = code_inv<C>(amax);
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const int j = p.t + v * p.nthr;
    if (j < k8) {
      float f[kPack];
      unpack<T>(held[v], f);
      store_q8<C>(q_row + (int64_t)j * kPack, f, inv);
    }
  }
  if (p.t == 0) scale[p.row] = amax / C::kMax;
}

}  // namespace zq

// Instantiate `body` with constexpr kRow / kVecs matching a RowLaunch (split rows hold one pack a thread).
#define ZQ_ROW_CASE(R, V, ...) \
  case R * 8 + V: { constexpr int kRow = R; constexpr int kVecs = V; __VA_ARGS__; } break;
#define ZQ_DISPATCH_ROW(l, ...)                                                                            \
  switch ((l).layout * 8 + (l).vecs) {                                                                     \
    ZQ_ROW_CASE(1, 1, __VA_ARGS__) ZQ_ROW_CASE(1, 2, __VA_ARGS__) ZQ_ROW_CASE(1, 3, __VA_ARGS__)           \
    ZQ_ROW_CASE(1, 4, __VA_ARGS__) ZQ_ROW_CASE(0, 1, __VA_ARGS__) ZQ_ROW_CASE(0, 2, __VA_ARGS__)           \
    ZQ_ROW_CASE(0, 3, __VA_ARGS__) ZQ_ROW_CASE(0, 4, __VA_ARGS__) ZQ_ROW_CASE(2, 1, __VA_ARGS__)           \
    default: return cudaErrorInvalidValue;                                                                \
  }
