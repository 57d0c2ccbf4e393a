// Pieces the decode-shaped GEMM's configurations share (gemm_skinny.cu: the mma.sync configurations 0-3,
// gemm_skinny_wgmma.cu: the Hopper wgmma configuration 4): how a lane reads its share of a weight chunk, the INT4
// unpack into int8 A-fragment words, the exact K-group fold and the epilogue. A chunk is 128 k; lane (g, t) of a
// warp owning 16 weight rows reads 32 consecutive k of rows g and g + 8, so word q of its A words holds physical k
// 32t + 4q .. + 3 and the MMA's k step s (0..3) takes words 2s, 2s + 1: the same k order must be given to x.
#pragma once
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "mma_sm80.cuh"
#include "zq/device_math.cuh"
#include "zq/gemm.h"
#include "zq/launch.cuh"

namespace zq::skinny {

constexpr int kChunk = 128;  // k per warp step: four k32 MMA steps
constexpr int64_t kMaxRowK = 65536;  // row scales: the int32 sum of K terms of |x * w| <= 2^14 stays exact
constexpr int kMaxM = 64;

// 16 bytes of a weight row: read once, so kept out of L1 (the x rows stay there for the other warps).
__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Weight rows n0 .. n0 + rows of the block (contiguous: the weight is [N, K] row-major) as an L2 prefetch when
// they end within `budget` bytes of the weight's start (the first blocks of the grid, those that run first), else
// none. Kernel arguments only: no memory is read before the wait.
__device__ __forceinline__ zq::L2Prefetch weight_rows(const zq_gemm_args& a, int64_t n0, int rows, int wbits,
                                                     int64_t budget) {
  const int64_t row_bytes = a.k * wbits / 8, begin = n0 * row_bytes, bytes = rows * row_bytes;
  if (begin + bytes > budget || bytes > UINT32_MAX) return {nullptr, 0};
  return {static_cast<const uint8_t*>(a.wq) + begin, (uint32_t)bytes};
}

// One lane's raw bytes of a 16-row weight chunk: 32 k of rows g and g + 8 (INT8: 8 words, INT4: 4 words a row)
// and, with K groups, the two rows' scales of the chunk's group.
template <int WBITS, bool KG>
struct WChunk {
  static constexpr int kWords = WBITS == 8 ? 8 : 4;
  uint32_t w[2][kWords];
  float sc[2];
};

template <int WBITS, bool KG>
__device__ __forceinline__ void load_w(const zq_gemm_args& a, int64_t n0, int64_t c, int g, int t,
                                       WChunk<WBITS, KG>& ch) {
  const int64_t k0 = c * kChunk + 32 * t;
  const auto* w = static_cast<const uint8_t*>(a.wq);
  const int64_t wrow = a.k * WBITS / 8;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t n = n0 + g + 8 * h;
    const uint8_t* p = w + n * wrow + k0 * WBITS / 8;
    const uint4 v = ld_stream(p);
    ch.w[h][0] = v.x, ch.w[h][1] = v.y, ch.w[h][2] = v.z, ch.w[h][3] = v.w;
    if constexpr (WBITS == 8) {
      const uint4 u = ld_stream(p + 16);
      ch.w[h][4] = u.x, ch.w[h][5] = u.y, ch.w[h][6] = u.z, ch.w[h][7] = u.w;
    }
    if constexpr (KG) ch.sc[h] = __ldg(a.w_scale + n * a.groups + c * kChunk / (a.k / a.groups));
  }
}

// The chunk as int8 words (INT4: x 16, mma_sm80.cuh unpack_int4x16): wa[h][q] = row g + 8h, physical k 32t + 4q ..
template <int WBITS, bool KG>
__device__ __forceinline__ void int8_words(const WChunk<WBITS, KG>& ch, uint32_t (&wa)[2][8]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if constexpr (WBITS == 8) {
#pragma unroll
      for (int q = 0; q < 8; ++q) wa[h][q] = ch.w[h][q];
    } else {
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        uint32_t b[2];
        mma::unpack_int4x16(ch.w[h][p], b);
        wa[h][2 * p] = b[0], wa[h][2 * p + 1] = b[1];
      }
    }
  }
}

// K groups: facc += float(iacc) * scale of the chunk's group, iacc = 0. |iacc| <= 128 * 2^14 = 2^21 < 2^22, so
// the float conversion through the bit pattern is exact (IADD + FADD at full rate instead of I2F).
__device__ __forceinline__ void fold_one(int& iacc, float& facc, float scale) {
  facc = fmaf(__int_as_float(0x4B400000 + iacc) - 12582912.f, scale, facc);
  iacc = 0;
}

// out[m, n] from v = the dequantized sum (acc * w_scale), in the reference's order:
// ((acc * w_scale) * x_scale + bias) -> act -> + residual.
template <class OutT>
__device__ __forceinline__ void store_out(const zq_gemm_args& a, int m, int64_t n, float v) {
  const auto* bias = static_cast<const OutT*>(a.bias);
  const auto* residual = static_cast<const OutT*>(a.residual);
  v = v * a.x_scale[m] + (bias ? to_f<OutT>(bias[n]) : 0.f);
  v = apply_act(v, a.act);
  if (residual) v += to_f<OutT>(residual[m * a.n + n]);
  static_cast<OutT*>(a.out)[m * a.n + n] = from_f<OutT>(v);
}

// The K split over a thread-block cluster (configurations 3 and 4): each block has left its partial tile in its
// own shared memory as part[token * pitch + row] words (fp32 with K groups, else int32); after cluster.sync(), block
// `rank` of `split` sums rows rank * rows / split .. of every block's tile in rank order (deterministic) through
// distributed shared memory and writes them; the closing sync keeps the tiles alive until every block has read.
template <int WBITS, bool KG, class OutT>
__device__ __forceinline__ void cluster_sum_store(const zq_gemm_args& a, uint32_t* part, int pitch, int rows_all,
                                                  int64_t row0, int rank, int split) {
  namespace cg = cooperative_groups;
  constexpr float kUnscale = WBITS == 4 ? 1.f / 16 : 1.f;  // the INT4 unpack's x 16
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  const int rows = rows_all / split, r0 = rank * rows, mv = (int)a.m;
  for (int e = threadIdx.x; e < rows * mv; e += blockDim.x) {
    const int r = r0 + e % rows, m = e / rows;
    const int idx = m * pitch + r;
    float v;
    if constexpr (KG) {
      v = 0.f;
      for (int q = 0; q < split; ++q) v += __uint_as_float(cluster.map_shared_rank(part, q)[idx]);
      v *= kUnscale;
    } else {
      int sum = 0;
      for (int q = 0; q < split; ++q) sum += (int)cluster.map_shared_rank(part, q)[idx];
      v = (float)sum * (a.w_scale[row0 + r] * kUnscale);
    }
    store_out<OutT>(a, m, row0 + r, v);
  }
  cluster.sync();
}

// Launch a K-split kernel(a, cps): grid (split, N / rows), clusters of (split, 1, 1), so rank = blockIdx.x.
inline cudaError_t launch_split_k(void (*kernel)(const zq_gemm_args, int), const zq_gemm_args& a, int split,
                                  int rows, int threads, size_t smem, int cps, cudaStream_t stream) {
  return zq::launch_cluster(kernel, dim3((unsigned)split, (unsigned)(a.n / rows), 1), dim3((unsigned)threads),
                            dim3((unsigned)split, 1, 1), smem, stream, a, cps);
}

namespace wg {
// Configuration 4 (gemm_skinny_wgmma.cu, sm_90a): 64 weight rows a block of one warpgroup, N % 64 == 0. Returns
// cudaErrorNotSupported on any other device or when the library was built without sm_90a code.
cudaError_t run(const zq_gemm_args& a, cudaStream_t stream);
}  // namespace wg

}  // namespace zq::skinny
