// Configuration 4 of the decode-shaped GEMM (zq_gemm_skinny_config, sm_90a): the tokens of M <= 64 as the N of a
// Hopper wgmma m64n64k32 (s8 x s8 -> s32) with the weight as its register-sourced A. Configurations 0-3 issue
// mma.sync m16n8k32, eight of them per 16 weight rows and k step at M = 64, and read x from L1 / L2 or shared
// memory once per warp; here one asynchronous instruction covers 64 weight rows x 64 tokens x 32 k, so at
// M = 33-64 the tensor work no longer bounds the weight stream.
//  - A (the weight) goes from global memory straight into registers, as in the other configurations: warp w of the
//    warpgroup owns rows 16w .. 16w + 15 and lane (g, t) loads 32 consecutive k of rows g and g + 8 per 128-k
//    chunk (gemm_skinny.cuh); the wgmma register layout of A per warp is mma.sync m16n8k32's. Chunks are loaded
//    P ahead (INT8: 2, INT4: 4) and, for INT4, unpacked to int8 just before their MMAs.
//  - B (x) is staged per chunk in shared memory in the no-swizzle K-major core-matrix layout (8 tokens x 16 bytes a
//    core matrix, 128 B; the two 16-k halves of a k32 step 128 B apart, token groups 256 B apart), in the k order
//    of A's registers: logical k 16h + 4t + j of step s is physical k 32t + 8s + 4h + j. The copy is 4-byte
//    cp.async (the order is a permutation of 4-byte words), kStages chunks deep, refilled kStages - 2 ahead.
//  - K groups: each chunk's int32 tile goes to its own accumulator set (two alternating), and once the next chunk's
//    MMAs are issued, the previous set is folded into fp32 with its rows' scales (exact, fold_one). Row scales: one
//    int32 chain over the whole K slice (exact, K <= 65536).
//  - K is split over a thread-block cluster of S blocks (S = 1, 2, 4, 8: the fewest that give every SM two
//    blocks); the partial tiles are summed in rank order through distributed shared memory (deterministic).
// Tokens past M are never copied (their smem words are stale): their output columns are never written.
// Status (H200, bench/results/gemm_decode_wgmma_H200.md): correct (tests/gpu/test_gemm_skinny.py) but slower than
// configurations 0 / 2 and the CUTLASS INT8 kernel everywhere (INT4 gate+up at M = 64: 113 us vs 84): ptxas
// allocates the A fragments of a chunk's four k steps to the same four registers (SASS: IGMMA R24, R108 three
// times, R104 once) and so serializes each wgmma behind WARPGROUP.DEPBAR.LE gsb0, 0x0 (ptxas C7513 / C7514).
// Keeping the fragments distinct (as CUTLASS's register-sourced mainloops do) is the open step; not chosen.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gemm_launch.h"
#include "gemm_skinny.cuh"
#include "wgmma_sm90.cuh"

namespace zq::skinny::wg {

constexpr int kRows = 64;    // one warpgroup: 4 warps x 16 weight rows
constexpr int kThreads = 128;
constexpr int kTok = 64;     // the MMA's N
constexpr int kStages = 4;
constexpr int kAhead = kStages - 2;  // the stage refilled at chunk c was last read by chunk c - 2's MMAs
constexpr int kStageBytes = kTok * kChunk;  // 4 k32 tiles of [8 token groups][2 k halves][8 tokens][16 B]
constexpr int kTileBytes = kTok * 32;
constexpr int kMaxSplit = 8;
constexpr int kPartPitch = kRows + 4;  // words; a fragment's store hits 32 distinct banks
static_assert(kStages * kStageBytes >= kTok * kPartPitch * 4, "the partial tile fits over the x stages");

__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}

#ifdef ZQ_WGMMA
// d (+)= A (64 x 32 s8, registers) * B (64 tokens x 32 k s8, shared memory); scale_d 0 ignores d's old value.
__device__ __forceinline__ void wgmma_64x64x32(uint32_t (&d)[32], const uint32_t (&a)[4], uint64_t desc,
                                               int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d));
}
#endif

// Chunk c of x (rows < M) into a stage. Lane (n % 8, t) of warp w copies, for tokens n = 8 (w + 4i) + n % 8, the
// 8 words 32t + 8s + 4h of its row (one 32-byte sector) to tile s, k half h, slot t: a warp's copy of one (s, h)
// stores to 32 distinct banks.
__device__ __forceinline__ void copy_x(const zq_gemm_args& a, int64_t c, uint32_t stage, int warp, int lane) {
  const int nl = lane >> 2, t = lane & 3;
  const auto* x = static_cast<const int8_t*>(a.x);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int n = 8 * (warp + 4 * i) + nl;
    if (n < a.m) {
      const int8_t* src = x + n * a.k + c * kChunk + 32 * t;
      const uint32_t dst = stage + (n >> 3) * 256 + (n & 7) * 16 + 4 * t;
#pragma unroll
      for (int s = 0; s < 4; ++s)
#pragma unroll
        for (int h = 0; h < 2; ++h) cp_async_4(dst + s * kTileBytes + h * 128, src + 8 * s + 4 * h);
    }
  }
}

template <int WBITS, bool KG>
struct State {
  static constexpr int P = WBITS == 8 ? 2 : 4;  // weight chunks in flight a lane
  WChunk<WBITS, KG> w[P];
  uint32_t af[2][4][4];   // A fragments of the last two chunks (read by their MMAs until those complete)
  uint32_t acc[2][32];    // K groups: a set a chunk, alternating; row scales: acc[0] only
  float facc[32];
  float sc[2][2];         // K groups: the rows' scales of the chunks in acc[0] / acc[1]
};

// acc's 32 values: d[4j + r] = row g + 8 (r >> 1) of the warp, token 8j + 2t + (r & 1).
template <int WBITS, bool KG>
__device__ __forceinline__ void fold_set(State<WBITS, KG>& st, int set) {
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    int v = (int)st.acc[set][i];
    fold_one(v, st.facc[i], st.sc[set][(i & 3) >> 1]);
  }
}

// Chunk ci of the block's slice; p = ci % P (compile-time, so every array index is static).
template <int p, int WBITS, bool KG>
__device__ __forceinline__ void chunk_step(const zq_gemm_args& a, State<WBITS, KG>& st, int ci, int nc, int64_t c0,
                                           int64_t n0, uint32_t sbase, int warp, int lane) {
#ifdef ZQ_WGMMA
  constexpr int P = State<WBITS, KG>::P, set = p & 1;
  const int g = lane >> 2, t = lane & 3;
  mma::cp_async_wait<kAhead - 1>();  // this thread's copies of chunk ci,
  wgmma::proxy_fence();              // made visible to the MMAs' (async-proxy) reads,
  __syncthreads();                   // everyone's; and chunk ci - 2's MMAs are complete (the wait below)
  if (ci + kAhead < nc) copy_x(a, c0 + ci + kAhead, sbase + ((ci + kAhead) % kStages) * kStageBytes, warp, lane);
  mma::cp_async_commit();

  uint32_t wa[2][8];
  int8_words(st.w[p], wa);
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    st.af[set][s][0] = wa[0][2 * s], st.af[set][s][1] = wa[1][2 * s];
    st.af[set][s][2] = wa[0][2 * s + 1], st.af[set][s][3] = wa[1][2 * s + 1];
  }
  if constexpr (KG) st.sc[set][0] = st.w[p].sc[0], st.sc[set][1] = st.w[p].sc[1];
  if (ci + P < nc) load_w(a, n0, c0 + ci + P, g, t, st.w[p]);

  uint32_t(&acc)[32] = st.acc[KG ? set : 0];
  const uint32_t tile = sbase + (ci % kStages) * kStageBytes;
#pragma unroll
  for (int s = 0; s < 4; ++s) wgmma::reg_fence(st.af[set][s]);  // every A word defined before the MMAs start
  // K groups: this set's last MMAs (chunk ci - 2) are complete. Row scales: the chain's previous MMAs may still
  // be in flight, so nothing but wgmma may touch acc until the final wait.
  if constexpr (KG) wgmma::reg_fence(acc);
  wgmma::fence();
#pragma unroll
  for (int s = 0; s < 4; ++s)
    wgmma_64x64x32(acc, st.af[set][s], wgmma::desc_k32(tile + s * kTileBytes), KG ? s > 0 : (ci > 0 || s > 0));
  wgmma::commit();
  // K groups: chunk ci - 1 is complete (its set is folded below while chunk ci runs). Row scales: each chunk is
  // waited for before the next is issued (with chunk ci - 1 left in flight the INT8 results were wrong on the H200:
  // ptxas gives the four k steps' A fragments the same registers, see the note at the top).
  if constexpr (KG) wgmma::wait<1>();
  else wgmma::wait<0>();
  if constexpr (KG) {
    if (ci > 0) {
      wgmma::reg_fence(st.acc[set ^ 1]);
      fold_set(st, set ^ 1);
    }
  }
#endif
}

template <int WBITS, bool KG, class OutT>
__global__ void __launch_bounds__(kThreads, 2) gemm_skinny_wgmma_kernel(const zq_gemm_args a, int cps) {
  zq::pdl_begin();
#ifdef ZQ_WGMMA
  __shared__ __align__(128) uint8_t smem[kStages * kStageBytes];
  constexpr int P = State<WBITS, KG>::P;
  const int split = (int)gridDim.x, rank = (int)blockIdx.x;  // cluster (split, 1, 1): rank = blockIdx.x
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t row0 = (int64_t)blockIdx.y * kRows, n0 = row0 + 16 * warp;
  const int64_t chunks = a.k / kChunk, c0 = (int64_t)rank * cps;
  const int nc = (int)(c0 >= chunks ? 0 : (chunks - c0 < cps ? chunks - c0 : cps));
  const uint32_t sbase = mma::smem_addr(smem);

  State<WBITS, KG> st;
#pragma unroll
  for (int i = 0; i < 32; ++i) st.acc[0][i] = st.acc[1][i] = 0u, st.facc[i] = 0.f;
#pragma unroll
  for (int q = 0; q < kAhead; ++q) {
    if (q < nc) copy_x(a, c0 + q, sbase + q * kStageBytes, warp, lane);
    mma::cp_async_commit();
  }
#pragma unroll
  for (int q = 0; q < P; ++q)
    if (q < nc) load_w(a, n0, c0 + q, g, t, st.w[q]);

  for (int i = 0; i < nc; i += P) {
    chunk_step<0>(a, st, i, nc, c0, n0, sbase, warp, lane);
    if (i + 1 < nc) chunk_step<1>(a, st, i + 1, nc, c0, n0, sbase, warp, lane);
    if constexpr (P == 4) {
      if (i + 2 < nc) chunk_step<2>(a, st, i + 2, nc, c0, n0, sbase, warp, lane);
      if (i + 3 < nc) chunk_step<3>(a, st, i + 3, nc, c0, n0, sbase, warp, lane);
    }
  }
  wgmma::wait<0>();
  wgmma::reg_fence(st.acc[0]);
  wgmma::reg_fence(st.acc[1]);
  if constexpr (KG) {
    if (nc > 0) {
      if ((nc - 1) & 1) fold_set(st, 1);
      else fold_set(st, 0);
    }
  }

  // The partial tile, [token][row] words, over the x stages (every MMA and copy is done).
  mma::cp_async_wait<0>();
  __syncthreads();
  auto* part = reinterpret_cast<uint32_t*>(smem);
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r)
      part[(8 * j + 2 * t + (r & 1)) * kPartPitch + 16 * warp + g + 8 * (r >> 1)] =
          KG ? __float_as_uint(st.facc[4 * j + r]) : st.acc[0][4 * j + r];
  cluster_sum_store<WBITS, KG, OutT>(a, part, kPartPitch, kRows, row0, rank, split);
#endif
}

template <int WBITS, bool KG, class OutT>
cudaError_t launch(const zq_gemm_args& a, int split, int cps, cudaStream_t stream) {
  return launch_split_k(gemm_skinny_wgmma_kernel<WBITS, KG, OutT>, a, split, kRows, kThreads, 0, cps, stream);
}

// The fewest blocks a row tile (1, 2, 4, 8; no more than the chunks) that give every SM two.
inline int pick_split(int64_t n, int64_t k, int sm_count, int* cps) {
  const int64_t tiles = n / kRows, chunks = k / kChunk;
  int s = 1;
  while (s < kMaxSplit && tiles * s < 2 * (int64_t)sm_count && 2 * s <= chunks) s *= 2;
  *cps = (int)((chunks + s - 1) / s);
  return s;
}

struct Launch4 {
  template <int WBITS, bool KG, class OutT>
  static cudaError_t run(const zq_gemm_args& a, cudaStream_t stream) {
    DeviceInfo dev;
    if (!current_device_info(&dev)) return cudaErrorInvalidDevice;
    int cps = 0;
    const int split = pick_split(a.n, a.k, dev.sm_count, &cps);
    return launch<WBITS, KG, OutT>(a, split, cps, stream);
  }
};

cudaError_t run(const zq_gemm_args& a, cudaStream_t stream) {
  DeviceInfo dev;
  if (!current_device_info(&dev)) return cudaErrorInvalidDevice;
  if (dev.cc_major != 9 || a.n % kRows) return cudaErrorNotSupported;
  return launch_by_type<Launch4>(a, stream);
}

}  // namespace zq::skinny::wg
