// Decode-shaped INT8 tensor-core GEMM (M <= 64 tokens): int8 activations times INT8 or packed INT4 weights, row
// or K-group scales, the dequantization epilogue of gemm.h fused. At these M the GEMM is bound by reading the
// weight once, so the kernel is built around streaming it:
//  - swap-AB: out^T = W x^T on mma.sync m16n8k32, the weight's N as the MMA's M (16 weight rows a tile) and the
//    tokens as its N (8 a tile), so M = 1..64 costs 1..8 thin tiles instead of a 64-row tile of mostly padding;
//  - the weight goes straight from global memory into the A fragments (no shared memory, no ldmatrix): within a
//    128-k chunk lane (g, t) loads 32 consecutive k of weight rows g and g + 8 (two 16-byte loads for INT8, one
//    for INT4) and 32 consecutive k of token g's x. The MMA's k slots of lane t then hold physical k 32t + 8s ..
//    (step s = 0..3) for both operands alike, and a dot product does not depend on the order of its k: no
//    weight re-layout is needed, the checkpoint's [N, K] rows are read as they are;
//  - split-K inside the block: the block's 8 warps own the same 16 (or 32) weight rows and take every 8th
//    chunk of K each, so a GEMM of N = 4096 runs 2048 warps each streaming its own bytes; the next chunk's
//    weight and x are loaded before the current one is multiplied (two chunks in flight a warp). The 8 partial
//    tiles are summed through shared memory, in warp order, and the block writes its columns of out.
// Row scales: int32 partial sums, exact (K <= 65536), float(sum) * w_scale as the other kernels; K groups
// (group_k % 128 == 0, so a chunk lies in one group): each chunk's int32 sum folded into fp32 with its scale.
// INT4 is unpacked to int8 x 16 (mma_sm80.cuh unpack_int4x16), the 16 divided out through the scale (exact).
// FP8 (configurations 0-2, sm_90): E4M3 weights with row scales times E4M3 tokens on mma.sync m16n8k32 e4m3 (the
// same fragments, fp32 accumulators), the fp32 partials summed in warp order, then * w_scale as for INT8.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <type_traits>

#include "gemm_launch.h"
#include "gemm_skinny.cuh"

namespace zq::skinny {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kNumConfigs = 5;

__device__ __forceinline__ uint4 ld_x(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// The raw bytes of one chunk of a warp: 32 k of each of its 2 * RT weight rows (INT8: 8 words, INT4: 4 words
// a row) and of each of its NT tokens (8 words), plus the rows' K-group scales.
template <int RT, int NT, int WBITS, bool KG>
struct Chunk {
  static constexpr int kWordsW = WBITS == 8 ? 8 : 4;
  uint32_t w[RT][2][kWordsW];
  uint32_t x[NT][8];
  float sc[RT][2];
};

// The chunk's weight rows and their K-group scales (nothing of x: those can be in flight before x is known).
template <int RT, int NT, int WBITS, bool KG>
__device__ __forceinline__ void load_chunk_w(const zq_gemm_args& a, int64_t n0, int64_t c, int g, int t,
                                             Chunk<RT, NT, WBITS, KG>& ch) {
  const int64_t k0 = c * kChunk + 32 * t;
  const auto* w = static_cast<const uint8_t*>(a.wq);
  const int64_t wrow = a.k * WBITS / 8;
#pragma unroll
  for (int i = 0; i < RT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t n = n0 + 16 * i + g + 8 * h;
      const uint8_t* p = w + n * wrow + k0 * WBITS / 8;
      const uint4 v = ld_stream(p);
      ch.w[i][h][0] = v.x, ch.w[i][h][1] = v.y, ch.w[i][h][2] = v.z, ch.w[i][h][3] = v.w;
      if constexpr (WBITS == 8) {
        const uint4 u = ld_stream(p + 16);
        ch.w[i][h][4] = u.x, ch.w[i][h][5] = u.y, ch.w[i][h][6] = u.z, ch.w[i][h][7] = u.w;
      }
      if constexpr (KG) ch.sc[i][h] = __ldg(a.w_scale + n * a.groups + c * kChunk / (a.k / a.groups));
    }
}

// The chunk's x: 32 k of token m0 + 8j + g (zeros past M) from `x` ([M, K] codes), through the read-only path
// (kGlobal) or from shared memory.
template <bool kGlobal, int RT, int NT, int WBITS, bool KG>
__device__ __forceinline__ void load_chunk_x(const int8_t* x, int64_t m_count, int64_t k, int m0, int64_t c, int g,
                                             int t, Chunk<RT, NT, WBITS, KG>& ch) {
  const int64_t k0 = c * kChunk + 32 * t;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int64_t m = m0 + 8 * j + g;
    uint4 v0 = make_uint4(0, 0, 0, 0), v1 = v0;
    if (m < m_count) {
      const int8_t* p = x + m * k + k0;
      if constexpr (kGlobal) v0 = ld_x(p), v1 = ld_x(p + 16);
      else v0 = *reinterpret_cast<const uint4*>(p), v1 = *reinterpret_cast<const uint4*>(p + 16);
    }
    ch.x[j][0] = v0.x, ch.x[j][1] = v0.y, ch.x[j][2] = v0.z, ch.x[j][3] = v0.w;
    ch.x[j][4] = v1.x, ch.x[j][5] = v1.y, ch.x[j][6] = v1.z, ch.x[j][7] = v1.w;
  }
}

template <int RT, int NT, int WBITS, bool KG>
__device__ __forceinline__ void load_chunk(const zq_gemm_args& a, int64_t n0, int m0, int64_t c, int g, int t,
                                           Chunk<RT, NT, WBITS, KG>& ch) {
  load_chunk_w(a, n0, c, g, t, ch);
  load_chunk_x<true>(static_cast<const int8_t*>(a.x), a.m, a.k, m0, c, g, t, ch);
}

// iacc += the chunk's products (four k32 steps): int8 (Acc int) or FP8 E4M3 codes (Acc float, WBITS 8).
template <int RT, int NT, int WBITS, bool KG, class Acc>
__device__ __forceinline__ void multiply(const Chunk<RT, NT, WBITS, KG>& ch, Acc (&iacc)[RT][NT][4]) {
  uint32_t wa[RT][2][8];  // int8 words (INT4: x 16): word q holds physical k 32t + 4q .. + 3
#pragma unroll
  for (int i = 0; i < RT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if constexpr (WBITS == 8) {
#pragma unroll
        for (int q = 0; q < 8; ++q) wa[i][h][q] = ch.w[i][h][q];
      } else {
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          uint32_t b[2];
          mma::unpack_int4x16(ch.w[i][h][p], b);
          wa[i][h][2 * p] = b[0], wa[i][h][2 * p + 1] = b[1];
        }
      }
    }
#pragma unroll
  for (int s = 0; s < 4; ++s)
#pragma unroll
    for (int i = 0; i < RT; ++i) {
      const uint32_t af[4] = {wa[i][0][2 * s], wa[i][1][2 * s], wa[i][0][2 * s + 1], wa[i][1][2 * s + 1]};
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const uint32_t bf[2] = {ch.x[j][2 * s], ch.x[j][2 * s + 1]};
        mma::mma_k32(iacc[i][j], af, bf);
      }
    }
}

template <int RT, int NT, int WBITS, bool KG>
__device__ __forceinline__ void fold(const Chunk<RT, NT, WBITS, KG>& ch, int (&iacc)[RT][NT][4],
                                     float (&facc)[RT][NT][4]) {
#pragma unroll
  for (int i = 0; i < RT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) fold_one(iacc[i][j][r], facc[i][j][r], ch.sc[i][r >> 1]);
}

// The warps' partial tiles summed in warp order through shared memory (red: [warp][row][token], +1 so the rows of
// a warp's store land in different banks), then out[m, n0 + r] for the block's R rows.
template <int RT, int NT, int TG, int WBITS, bool KG, class OutT, bool F8, class Acc>
__device__ __forceinline__ void reduce_store(const zq_gemm_args& a, uint32_t (&red)[kWarps][16 * RT][8 * NT + 1],
                                             const Acc (&iacc)[RT][NT][4], const float (&facc)[RT][NT][4],
                                             int64_t n0, int warp, int g, int t) {
  constexpr int R = 16 * RT, MP = 8 * NT, kSplit = kWarps / TG;
  constexpr float kUnscale = WBITS == 4 ? 1.f / 16 : 1.f;
  // c0 = C[g][2t], c1 = C[g][2t + 1], c2 = C[g + 8][2t], c3 = C[g + 8][2t + 1] of each 16 x 8 tile
#pragma unroll
  for (int i = 0; i < RT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        uint32_t word;  // fp32 bits (K groups, FP8) or the int32 sum
        if constexpr (KG) word = __float_as_uint(facc[i][j][r]);
        else if constexpr (F8) word = __float_as_uint(iacc[i][j][r]);
        else word = (uint32_t)iacc[i][j][r];
        red[warp][16 * i + g + 8 * (r >> 1)][8 * j + 2 * t + (r & 1)] = word;
      }
  __syncthreads();

  const int mv = (int)a.m;  // <= 64
  for (int e = threadIdx.x; e < R * mv; e += kThreads) {
    const int r = e % R, m = e / R;  // consecutive threads: consecutive columns of out
    const int64_t n = n0 + r;
    const int w0 = kSplit * (m / MP), ml = m % MP;  // the warps of m's token group, m's row in their tiles
    float v;
    if constexpr (KG) {
      v = 0.f;
#pragma unroll
      for (int w = 0; w < kSplit; ++w) v += __uint_as_float(red[w0 + w][r][ml]);
      v *= kUnscale;  // the fold used the stored scales (exact: a power of two)
    } else if constexpr (F8) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < kSplit; ++w) s += __uint_as_float(red[w0 + w][r][ml]);
      v = s * a.w_scale[n];
    } else {
      int s = 0;
#pragma unroll
      for (int w = 0; w < kSplit; ++w) s += (int)red[w0 + w][r][ml];
      v = (float)s * (a.w_scale[n] * kUnscale);
    }
    store_out<OutT>(a, m, n, v);
  }
}

// TG token groups: the warps split into TG groups of kWarps / TG, group i multiplying tokens 8 NT i .. by every
// k chunk its warps take (split-K over kWarps / TG); a group's weight reads after the first come from L2. TG blocks an
// SM are asked of the register allocator (TG = 2: <= 128 registers a thread). F8: FP8 E4M3 operands (WBITS 8, row
// scales), fp32 accumulators.
// Before its wait the block asks L2 for its weight rows when they lie within the first `prefetch` bytes of the
// weight (weight_rows): under PDL they stream in while the kernel ahead runs. Budget 0 unless set (launch.cu: measured
// no faster).
template <int RT, int NT, int TG, int WBITS, bool KG, class OutT, bool F8 = false>
__global__ void __launch_bounds__(kThreads, TG) gemm_skinny_kernel(const zq_gemm_args a, int64_t prefetch) {
  zq::pdl_begin(weight_rows(a, (int64_t)blockIdx.x * 16 * RT, 16 * RT, WBITS, prefetch));
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  static_assert(!F8 || (WBITS == 8 && !KG), "FP8 weights: one byte a weight, row scales");
  using Acc = std::conditional_t<F8, float, int>;
  constexpr int R = 16 * RT, MP = 8 * NT, kSplit = kWarps / TG;
  static_assert(kWarps % TG == 0, "whole warp groups");
  __shared__ uint32_t red[kWarps][R][MP + 1];  // the warps' partial tiles (reduce_store)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t n0 = (int64_t)blockIdx.x * R;
  const int64_t chunks = a.k / kChunk;

  Acc iacc[RT][NT][4];
  float facc[RT][NT][4];
#pragma unroll
  for (int i = 0; i < RT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) iacc[i][j][r] = 0, facc[i][j][r] = 0.f;

  const int m0 = MP * (warp / kSplit);  // the warp's first token
  Chunk<RT, NT, WBITS, KG> cur, nxt;
  int64_t c = m0 < a.m ? warp % kSplit : chunks;  // a group past M has nothing to do
  if (c < chunks) load_chunk(a, n0, m0, c, g, t, cur);
  for (; c < chunks; c += kSplit) {
    if (c + kSplit < chunks) load_chunk(a, n0, m0, c + kSplit, g, t, nxt);
    multiply(cur, iacc);
    if constexpr (KG) fold(cur, iacc, facc);
    cur = nxt;
  }

  reduce_store<RT, NT, TG, WBITS, KG, OutT, F8>(a, red, iacc, facc, n0, warp, g, t);
#endif
}

template <int RT, int NT, int TG, int WBITS, bool KG, class OutT, bool F8>
cudaError_t launch(const zq_gemm_args& a, cudaStream_t stream) {
  const int64_t blocks = a.n / (16 * RT);
  if (blocks > INT32_MAX) return cudaErrorNotSupported;
  return zq::launch(gemm_skinny_kernel<RT, NT, TG, WBITS, KG, OutT, F8>, dim3((unsigned)blocks), dim3(kThreads), 0,
                    stream, a, zq::gemm_prefetch_bytes());
}

// Token tiles a warp (NT) from the tokens of its group.
template <int RT, int TG, int WBITS, bool KG, class OutT, bool F8 = false>
cudaError_t launch_nt(const zq_gemm_args& a, cudaStream_t stream) {
  const int64_t per_group = (a.m + TG - 1) / TG;
  if (per_group <= 8) return launch<RT, 1, TG, WBITS, KG, OutT, F8>(a, stream);
  if (per_group <= 16) return launch<RT, 2, TG, WBITS, KG, OutT, F8>(a, stream);
  if (per_group <= 32) return launch<RT, 4, TG, WBITS, KG, OutT, F8>(a, stream);
  if constexpr (RT == 1 && TG == 1) return launch<1, 8, 1, WBITS, KG, OutT, F8>(a, stream);
  return cudaErrorNotSupported;  // RT = 2 stops at M = 32 (the partial tiles' shared memory)
}

template <int RT, int TG>
struct Launch {
  template <int WBITS, bool KG, class OutT>
  static cudaError_t run(const zq_gemm_args& a, cudaStream_t stream) {
    return launch_nt<RT, TG, WBITS, KG, OutT>(a, stream);
  }
  static cudaError_t run_fp8(const zq_gemm_args& a, cudaStream_t stream) {  // out fp16 or bf16 (checked)
    return a.out_dt == ZQ_F16 ? launch_nt<RT, TG, 8, false, __half, true>(a, stream)
                              : launch_nt<RT, TG, 8, false, __nv_bfloat16, true>(a, stream);
  }
};

// Configuration 3 (sm_90): 128 weight rows a block, 16 a warp, and the 8 warps walk the same K chunks, so the x of
// the block's K slice, staged once in shared memory, serves all of them (configurations 0-2 read every x row once
// per 16 weight rows: at M = 64 that is 8x the INT4 weight's bytes, from L2). K is split over a thread-block
// cluster of S blocks (S = 1, 2, 4, 8: enough blocks for two an SM); each block keeps its partial tile in its own
// shared memory and, after a cluster barrier, block rank r sums rows r * 128 / S .. of all S tiles in rank order
// through distributed shared memory (deterministic, no workspace) and writes them. The weight is streamed into
// registers as in the other configurations, P chunks ahead (INT8: 2, INT4: 3: ~48-64 KB in flight an SM).
namespace cl {
constexpr int kRows = 16 * kWarps;
constexpr int kMaxSplit = 8;
constexpr size_t kMaxSmem = 113 * 1024;  // two blocks an SM: 2 x (113 + 1 reserved) KB = 228 KB

// iacc[j] += the chunk's 16 weight rows x token tile j, x read from shared memory (xs: this lane's 32 bytes of
// token g in the chunk; token tile j 8 rows of `pitch` bytes further).
template <int NT, int WBITS, bool KG>
__device__ __forceinline__ void multiply(const WChunk<WBITS, KG>& ch, const uint8_t* xs, int pitch,
                                         int (&iacc)[NT][4]) {
  uint32_t wa[2][8];
  int8_words(ch, wa);
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const uint4 v0 = *reinterpret_cast<const uint4*>(xs + 8 * j * pitch);
    const uint4 v1 = *reinterpret_cast<const uint4*>(xs + 8 * j * pitch + 16);
    const uint32_t xw[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const uint32_t af[4] = {wa[0][2 * s], wa[1][2 * s], wa[0][2 * s + 1], wa[1][2 * s + 1]};
      const uint32_t bf[2] = {xw[2 * s], xw[2 * s + 1]};
      mma::mma_s8(iacc[j], af, bf);
    }
  }
}

// Shared memory of a block: the x slice [MP rows][cps * 128 + 16 bytes], then (reusing it) the partial tile
// [MP tokens][kRows + 4 words].
__host__ __device__ constexpr int x_pitch(int cps) { return cps * kChunk + 16; }
constexpr int kPartPitch = kRows + 4;  // words; lanes (g, t) of a fragment store hit 32 distinct banks
__host__ __device__ constexpr size_t smem_bytes(int mp, int cps) {
  return (size_t)mp * x_pitch(cps) > (size_t)mp * kPartPitch * 4 ? (size_t)mp * x_pitch(cps)
                                                                  : (size_t)mp * kPartPitch * 4;
}

template <int NT, int WBITS, bool KG, class OutT>
__global__ void __launch_bounds__(kThreads, 2) gemm_skinny_cluster_kernel(const zq_gemm_args a, int cps) {
  zq::pdl_begin();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) uint8_t smem[];
  constexpr int P = WBITS == 8 ? 2 : 3;
  const int split = (int)gridDim.x, rank = (int)blockIdx.x;  // cluster (split, 1, 1): rank = blockIdx.x
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t row0 = (int64_t)blockIdx.y * kRows, n0 = row0 + 16 * warp;
  const int64_t chunks = a.k / kChunk, c0 = (int64_t)rank * cps;
  const int nc = (int)(c0 >= chunks ? 0 : (chunks - c0 < cps ? chunks - c0 : cps));
  const int pitch = x_pitch(cps), mv = (int)a.m;

  WChunk<WBITS, KG> w[P];
#pragma unroll
  for (int p = 0; p < P; ++p)
    if (p < nc) load_w(a, n0, c0 + p, g, t, w[p]);
  {  // the x slice: rows m < M (the padding rows' columns of the tiles are never written out)
    const auto* x = static_cast<const int8_t*>(a.x);
    const int row16 = nc * kChunk / 16;
    for (int e = threadIdx.x; e < mv * row16; e += kThreads) {
      const int m = e / row16, q = e % row16;
      mma::cp_async_16(mma::smem_addr(smem + m * pitch + 16 * q), x + m * a.k + c0 * kChunk + 16 * q, true);
    }
    mma::cp_async_commit();
    mma::cp_async_wait<0>();
  }
  __syncthreads();

  int iacc[NT][4];
  float facc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) iacc[j][r] = 0, facc[j][r] = 0.f;
  const uint8_t* xs = smem + g * pitch + 32 * t;
  for (int i = 0; i < nc; i += P) {
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int ci = i + p;
      if (ci < nc) {
        multiply<NT>(w[p], xs + ci * kChunk, pitch, iacc);
        if constexpr (KG) {
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) fold_one(iacc[j][r], facc[j][r], w[p].sc[r >> 1]);
        }
        if (ci + P < nc) load_w(a, n0, c0 + ci + P, g, t, w[p]);
      }
    }
  }

  // The partial tile, [token][row] words, over the x slice (every warp is past its last read of it).
  __syncthreads();
  auto* part = reinterpret_cast<uint32_t*>(smem);
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r)
      part[(8 * j + 2 * t + (r & 1)) * kPartPitch + 16 * warp + g + 8 * (r >> 1)] =
          KG ? __float_as_uint(facc[j][r]) : (uint32_t)iacc[j][r];
  cluster_sum_store<WBITS, KG, OutT>(a, part, kPartPitch, kRows, row0, rank, split);
#endif
}

template <int NT, int WBITS, bool KG, class OutT>
cudaError_t launch(const zq_gemm_args& a, int split, int cps, cudaStream_t stream) {
  auto* kernel = gemm_skinny_cluster_kernel<NT, WBITS, KG, OutT>;
  static const cudaError_t attr =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)kMaxSmem);
  if (attr != cudaSuccess) return attr;
  return launch_split_k(kernel, a, split, kRows, kThreads, smem_bytes(8 * NT, cps), cps, stream);
}

// The split: the fewest blocks a row tile (1, 2, 4, 8; no more than the chunks) that give every SM two blocks,
// more if the x slice would not fit the shared memory of two blocks an SM. 0: none fits.
inline int pick_split(int mp, int64_t n, int64_t k, int sm_count, int* cps) {
  const int64_t tiles = n / kRows, chunks = k / kChunk;
  for (int s = 1; s <= kMaxSplit; s *= 2) {
    *cps = (int)((chunks + s - 1) / s);
    const bool enough = tiles * s >= 2 * (int64_t)sm_count || s == kMaxSplit || 2 * s > chunks;
    if (enough && smem_bytes(mp, *cps) <= kMaxSmem) return s;
  }
  return 0;
}

struct Launch3 {
  template <int WBITS, bool KG, class OutT>
  static cudaError_t run(const zq_gemm_args& a, cudaStream_t stream) {
    const int nt = a.m <= 8 ? 1 : a.m <= 16 ? 2 : a.m <= 32 ? 4 : 8;
    zq::DeviceInfo dev;
    if (!zq::current_device_info(&dev)) return cudaErrorInvalidDevice;
    int cps = 0;
    const int split = pick_split(8 * nt, a.n, a.k, dev.sm_count, &cps);
    if (split == 0) return cudaErrorNotSupported;
    switch (nt) {
      case 1: return launch<1, WBITS, KG, OutT>(a, split, cps, stream);
      case 2: return launch<2, WBITS, KG, OutT>(a, split, cps, stream);
      case 4: return launch<4, WBITS, KG, OutT>(a, split, cps, stream);
      default: return launch<8, WBITS, KG, OutT>(a, split, cps, stream);
    }
  }
};
}  // namespace cl

// Configuration 0: 16 weight rows a block; 1: 32 (each x fragment used twice; half the blocks); 2: 16 rows, the
// tokens in two groups of warps (half the token tiles a warp: for M > 32 two blocks fit an SM instead of one;
// each group splits K four ways). The library's choice, from the forced-configuration table
// (bench/results/gemm_decode_NVIDIA_H200.md, H200; 0.6 % over the best configuration summed over its rows, 1.08x
// at worst): 32 rows at M <= 16 where N / 32 still covers every SM; at M > 32 configuration 2 unless the
// one-block-an-SM grid takes an odd number of waves (N / 16 blocks over the SMs), where its two-block waves would
// leave the last one at most half full (N = 2048 / 6144 on 132 SMs: 1 and 3 waves, configuration 0 ahead by
// 5-37 %); else 16 rows.
int pick_config(int64_t m, int64_t n, int sm_count) {
  if (n % 32 == 0 && m <= 16 && n / 32 >= (int64_t)sm_count) return 1;
  const int64_t waves = (n / 16 + sm_count - 1) / sm_count;
  return m > 32 && waves % 2 == 0 ? 2 : 0;
}

}  // namespace zq::skinny

namespace zq::skinny {
// What zq_gemm_skinny_config needs of its INT8 / INT4 weights (row scales with K
// within the exact int32 sum, or K groups of a multiple of 128), out (fp16 / bf16, 2-byte aligned, with the bias
// and the residual) and shape (K a multiple of 128, N of 16).
inline bool int_weights(const zq_gemm_args& a) {
  return (a.w_bits == 8 || a.w_bits == 4) && a.groups >= 1 && a.k % a.groups == 0 &&
         (a.groups == 1 ? a.k <= kMaxRowK : (a.k / a.groups) % kChunk == 0);
}
inline bool shape_and_out(const zq_gemm_args& a) {
  using zq::misaligned;
  return (a.out_dt == ZQ_F16 || a.out_dt == ZQ_BF16) && a.k != 0 && a.k % kChunk == 0 && a.n % 16 == 0 && a.w_scale &&
         !misaligned(a.wq, 16) && !misaligned(a.out, 2) && !misaligned(a.residual, 2) && !misaligned(a.bias, 2);
}
}  // namespace zq::skinny

ZQ_API cudaError_t zq_gemm_skinny_config(const zq_gemm_args* a, int cfg, cudaStream_t stream) {
  using namespace zq::skinny;
  using zq::misaligned;
  if (a->m < 0 || a->n < 0 || a->k < 0) return cudaErrorInvalidValue;
  // The operands' formats: FP8 E4M3 x E4M3 with row scales (configurations 0-2, compute capability 9.0+), or
  // int8 x INT8 / INT4 (int_weights).
  const bool fp8 = a->w_fp8;
  const bool formats = fp8 ? a->x_dt == ZQ_FP8_E4M3 && !a->x_is_int8 && a->w_bits == 8 && a->groups == 1
                           : a->x_is_int8 && int_weights(*a);
  if (!formats || !shape_and_out(*a) || a->m > kMaxM || !a->x_scale || misaligned(a->x, 16))
    return cudaErrorNotSupported;
  zq::DeviceInfo dev;
  if (const cudaError_t e = zq::sm80_device(cfg, kNumConfigs, &dev); e != cudaSuccess) return e;
  if (fp8 && dev.cc_major < 9) return cudaErrorNotSupported;  // E4M3 mma.sync: sm_89+, measured on sm_90 only
  if (a->m == 0 || a->n == 0) return cudaSuccess;
  if (cfg < 0) cfg = pick_config(a->m, a->n, dev.sm_count);
  if (cfg == 1 && (a->n % 32 || a->m > 32)) return cudaErrorNotSupported;
  if (fp8) {
    if (cfg > 2) return cudaErrorNotSupported;
    if (cfg == 2) return Launch<1, 2>::run_fp8(*a, stream);
    return cfg == 1 ? Launch<2, 1>::run_fp8(*a, stream) : Launch<1, 1>::run_fp8(*a, stream);
  }
  if (cfg == 3 && (!zq::sm90_code() || a->n % cl::kRows)) return cudaErrorNotSupported;
  if (cfg == 3) return zq::launch_by_type<cl::Launch3>(*a, stream);
  if (cfg == 4) return wg::run(*a, stream);
  if (cfg == 2) return zq::launch_by_type<Launch<1, 2>>(*a, stream);
  return cfg == 1 ? zq::launch_by_type<Launch<2, 1>>(*a, stream) : zq::launch_by_type<Launch<1, 1>>(*a, stream);
}

ZQ_API cudaError_t zq_gemm_skinny(const zq_gemm_args* a, cudaStream_t stream) {
  return zq_gemm_skinny_config(a, -1, stream);
}

ZQ_API int zq_gemm_skinny_num_configs(void) { return zq::skinny::kNumConfigs; }
