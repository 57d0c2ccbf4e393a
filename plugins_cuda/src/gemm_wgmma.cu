// The large-M GEMM of K-group weights on Hopper (zq_gemm_wgmma, sm_90a): A8 x INT8 or packed INT4 weights with K-group
// scales (or one scale a row) on wgmma m64n{128,64}k32 s8, where the sm80-style mma.sync kernel (gemm_mma.cu) runs
// at ~230-250 TOP/s on the 8B MLP shapes and the CUTLASS kernel (gemm_sm90.cu) takes row scales only. Swap-AB: a
// block's 128 weight rows are the MMA's M (warpgroup w: rows 64w .. 64w + 63), its 128 (configurations 0, 2) or 64
// (1) tokens the MMA's N, so a K-group scale belongs to an accumulator row (two a thread) and the fold multiplies
// by a register. H200: 1.5-2.7x the mma kernel from M = 1024, 14-23 % of the INT8 peak from M = 2048
// (bench/results/gemm_wgmma_NVIDIA_H200.md; bench/NOTES_kernels.md "Stop 34" has the steps and the profile).
//  - Operands go global -> shared by cp.async (16 bytes a copy), kStages stages of 128 k deep, refilled kAhead =
//    kStages - 2 ahead: the stage refilled at step i was last read by step i - 2's MMAs, which the wait at step
//    i - 1 completed. x and INT8 weights land in the 128-byte-swizzled K-major layout (wgmma_sm90.cuh) the MMAs
//    read; packed INT4 rows land as they are (80-byte pitch) and every thread unpacks its share (x 16, as
//    unpack_int4x16, in k order) into one of two int8 tiles in that layout before the stage's MMAs.
//  - K groups: at a group's last step the warpgroup waits for its MMAs and folds the int32 tile into fp32 with its
//    rows' scales (exact; the other warpgroup's MMAs keep the tensor cores busy meanwhile); the next group's first
//    MMA overwrites the tile. Row scales: one int32 chain over K, one step's MMAs left in flight.
//  - The epilogue stages the tile in shared memory ([token][row] fp32) and writes rows of out with the bias,
//    activation and residual in the mma kernel's order: the same bits as zq_gemm_mma.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "gemm_launch.h"
#include "mma_sm80.cuh"
#include "wgmma_sm90.cuh"
#include "zq/device_math.cuh"
#include "zq/gemm.h"

namespace zq::wgmma_gemm {

using zq::wgmma::sw128_offset;

constexpr int kW = 128;        // weight rows a block (2 warpgroups x the MMA's M of 64)
constexpr int kBK = 128;       // k a stage: 4 k32 MMA steps
constexpr int kThreads = 256;
constexpr int kStages = 4;
constexpr int kAhead = kStages - 2;
constexpr int kOpBytes = kW * kBK;           // 128 weight rows x 128 k, the MMA layout (INT8 weights, unpacked INT4)
constexpr int kPacked = 80;                   // packed INT4 row pitch: 64 bytes + 16 (8 rows' 16-byte reads hit
                                              // distinct banks)
constexpr int kOutPitch = kW + 4;             // fp32 words a token of the staged tile
constexpr int64_t kMaxGroupK = 65536;         // int32 sums exact: |x * w| <= 2^14 (INT4 codes x 16)

// T: tokens a block (the MMA's N): 128 (one block an SM) or 64 (two: fewer registers and shared memory).
template <int WBITS, int T> struct Smem {
  static constexpr int kXBytes = T * kBK;
  static constexpr int kWBytes = WBITS == 8 ? kOpBytes : kW * kPacked;
  static constexpr int kStage = kXBytes + kWBytes;  // x, then the weight rows
  static constexpr int kUnpacked = WBITS == 8 ? 0 : 2 * kOpBytes;
  static constexpr int kMain = kStages * kStage + kUnpacked;
  static constexpr int kOut = T * kOutPitch * 4;
  static constexpr int kBytes = (kMain > kOut ? kMain : kOut) + 1024;  // + the base's alignment to 1024 B
  static_assert(kStage % 1024 == 0 && kXBytes % 1024 == 0, "every operand tile 1024-byte aligned (the swizzle)");
};

// A thread's share of a stage's copies, set up once (the per-stage cost is then one add and one cp.async a copy:
// 64-bit row arithmetic per copy was most of the mainloop's instructions). 128 (or T) rows x 128 k of int8 (INT8
// weights; x) into the MMA layout: copy i of the thread's 4 (x: T / 32) is row r0 + 32 i (r0 = tid % 8 +
// 8 (tid / 64)), 16-byte chunk p = (tid / 8) % 8, so a warp reads 8 rows x 64 contiguous bytes and each 8 lanes
// write 8 rows' chunk p at 8 distinct chunk positions (the swizzle); its shared offset is sw128_offset(r0, p) +
// 4096 i. Packed INT4 weight
// rows (128 x 64 bytes, kPacked pitch): copy i of 2 is row tid / 4 + 64 i, piece tid % 4.
struct CopyPlan {
  const int8_t* x;     // x row r0 of the block's tokens, at chunk p (k 0)
  const int8_t* w;     // the weight's row r0 (INT8) or tid / 4 (packed INT4) of the block, at its chunk (k 0)
  int64_t x_step, w_step;  // bytes between copy i and i + 1 (32 rows of x, 32 / 64 weight rows)
  uint32_t x_dst, w_dst;   // shared offsets of copy 0 within the operand tile
  int x_rows;              // rows of x at or past r0 that exist (copy i is valid while 32 i < x_rows)
};

template <int WBITS, int T>
__device__ __forceinline__ CopyPlan copy_plan(const zq_gemm_args& a, int64_t m0, int64_t n0) {
  const int tid = threadIdx.x, r0 = (tid & 7) + 8 * (tid >> 6), p = (tid >> 3) & 7;
  CopyPlan c;
  c.x_rows = (int)((a.m - m0 - r0) < T ? (a.m - m0 - r0) : T);
  c.x = static_cast<const int8_t*>(a.x) + (c.x_rows > 0 ? (m0 + r0) * a.k + 16 * p : 0);
  c.x_step = 32 * a.k;
  c.x_dst = sw128_offset(r0, p);
  if constexpr (WBITS == 8) {
    c.w = static_cast<const int8_t*>(a.wq) + (n0 + r0) * a.k + 16 * p;
    c.w_step = 32 * a.k;
    c.w_dst = sw128_offset(r0, p);
  } else {
    c.w = static_cast<const int8_t*>(a.wq) + (n0 + (tid >> 2)) * (a.k / 2) + 16 * (tid & 3);
    c.w_step = 64 * (a.k / 2);
    c.w_dst = (tid >> 2) * kPacked + 16 * (tid & 3);
  }
  return c;
}

template <int WBITS, int T>
__device__ __forceinline__ void load_stage(const CopyPlan& c, int kt, uint32_t stage) {
  constexpr int kX = Smem<WBITS, T>::kXBytes;
  const int64_t k0 = (int64_t)kt * kBK;
#pragma unroll
  for (int i = 0; i < T / 32; ++i) {
    const bool ok = 32 * i < c.x_rows;
    mma::cp_async_16(stage + c.x_dst + 4096 * i, ok ? c.x + i * c.x_step + k0 : c.x, ok);
  }
  if constexpr (WBITS == 8) {
#pragma unroll
    for (int i = 0; i < 4; ++i) mma::cp_async_16(stage + kX + c.w_dst + 4096 * i, c.w + i * c.w_step + k0, true);
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i)
      mma::cp_async_16(stage + kX + c.w_dst + 64 * kPacked * i, c.w + i * c.w_step + k0 / 2, true);
  }
}

// Eight packed INT4 values (k 0..7, even k in the low nibble) -> eight int8 x 16 in k order (two words).
__device__ __forceinline__ void unpack8(uint32_t w, uint32_t& lo, uint32_t& hi) {
  const uint32_t odd = w & 0xF0F0F0F0u, even = (w << 4) & 0xF0F0F0F0u;
  lo = __byte_perm(even, odd, 0x5140);  // k0 k1 k2 k3
  hi = __byte_perm(even, odd, 0x7362);  // k4 k5 k6 k7
}

// The stage's packed rows -> the MMA layout. Task q of 512: row (q % 8) + 8 (q / 32), k32 step s = (q / 8) % 4; its
// 16 packed bytes are chunks 2s, 2s + 1 of the row. Each 8 lanes read 8 rows (80-byte pitch: distinct banks) and
// write 8 rows' chunk, 8 distinct chunk positions.
__device__ __forceinline__ void unpack_stage(const uint8_t* packed, uint8_t* tile) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int q = threadIdx.x + kThreads * i, r = (q & 7) + 8 * (q >> 5), s = (q >> 3) & 3;
    const uint4 w = *reinterpret_cast<const uint4*>(packed + r * kPacked + 16 * s);
    uint4 h0, h1;
    unpack8(w.x, h0.x, h0.y);
    unpack8(w.y, h0.z, h0.w);
    unpack8(w.z, h1.x, h1.y);
    unpack8(w.w, h1.z, h1.w);
    *reinterpret_cast<uint4*>(tile + sw128_offset(r, 2 * s)) = h0;
    *reinterpret_cast<uint4*>(tile + sw128_offset(r, 2 * s + 1)) = h1;
  }
}

#ifdef ZQ_WGMMA
// d (+)= A (64 weight rows x 32 k, shared) * B (128 tokens x 32 k, shared); scale_d 0 ignores d's old value.
__device__ __forceinline__ void mma_64x128x32(uint32_t (&d)[64], uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
        "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
        "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
        "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "l"(da), "l"(db), "r"(scale_d));
}
// The same with 64 tokens (B 64 x 32 k).
__device__ __forceinline__ void mma_64x64x32(uint32_t (&d)[32], uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31])
      : "l"(da), "l"(db), "r"(scale_d));
}
__device__ __forceinline__ void mma_64xT(uint32_t (&d)[64], uint64_t da, uint64_t db, int sd) {
  mma_64x128x32(d, da, db, sd);
}
__device__ __forceinline__ void mma_64xT(uint32_t (&d)[32], uint64_t da, uint64_t db, int sd) {
  mma_64x64x32(d, da, db, sd);
}
#endif

template <bool KG, int T>
struct Acc {
  static constexpr int kN = T / 2;  // accumulators a thread
  uint32_t i[kN];        // d[4j + r]: weight row g + 8 (r >> 1) of the warp, token 8j + 2t + (r & 1)
  float f[KG ? kN : 1];  // K groups: the folded sum
  float sc[2];           // K groups: the rows' scales of the current group
};

// f += float(i) * the rows' scales sc: gemm_mma.cu fold_group's arithmetic, so the same bits (the conversion is
// I2FP on sm_90, exact for |v| < 2^24, where the mma kernel's bit-pattern conversion is exact; above, both round
// the same). Two instructions an accumulator; the bit-pattern add (three) measured slower (bench/NOTES_kernels.md).
template <int N>
__device__ __forceinline__ void fold(const uint32_t (&i)[N], float (&f)[N], const float (&sc)[2]) {
#pragma unroll
  for (int e = 0; e < N; ++e) f[e] = fmaf((float)(int)i[e], sc[(e & 3) >> 1], f[e]);
}

struct Ctx {
  int64_t m0, n0;
  uint32_t sbase, ubase;  // the stages; the two unpacked INT4 tiles
  uint8_t* smem;
  int wg, row;            // warpgroup; this thread's first weight row in the block (64 wg + 16 warp + g)
  int spg;                // steps a K group (K groups), or nk (row scales)
  CopyPlan cp;            // this thread's copies
};

// Step kt's MMAs (4 k32 steps of the block's 64 weight rows a warpgroup x T tokens), committed as one group; a K
// group's first step reads the group's scales first (their latency hidden under the MMAs) and overwrites the tile.
template <int WBITS, bool KG, int T>
__device__ __forceinline__ void issue_mmas(const zq_gemm_args& a, const Ctx& c, Acc<KG, T>& acc, int kt, bool first,
                                           uint32_t stage, uint32_t wtile) {
#ifdef ZQ_WGMMA
  constexpr float kUnscale = WBITS == 4 ? 1.f / 16 : 1.f;
  if constexpr (KG) {
    if (first) {
      const int64_t grp = kt / c.spg;
#pragma unroll
      for (int h = 0; h < 2; ++h)
        acc.sc[h] = __ldg(a.w_scale + (c.n0 + c.row + 8 * h) * a.groups + grp) * kUnscale;
    }
  }
  wgmma::reg_fence(acc.i);
  wgmma::fence();
#pragma unroll
  for (int s = 0; s < 4; ++s)
    mma_64xT(acc.i, wgmma::desc_sw128(wtile + c.wg * 64 * kBK + 32 * s), wgmma::desc_sw128(stage + 32 * s),
             first && s == 0 ? 0 : 1);
  wgmma::commit();
#endif
}

// Step kt of the mainloop; s_in_group = kt's index in its K group (row scales: in K): 0 opens the accumulator (its
// first MMA ignores the old value); a group's last step waits for its MMAs and folds them (the other warpgroup's
// MMAs run meanwhile); other steps leave one step's MMAs in flight.
template <int WBITS, bool KG, int T>
__device__ __forceinline__ void step(const zq_gemm_args& a, const Ctx& c, Acc<KG, T>& acc, int kt, int nk,
                                     int s_in_group) {
#ifdef ZQ_WGMMA
  using S = Smem<WBITS, T>;
  mma::cp_async_wait<kAhead - 1>();  // this thread's copies of stage kt
  if constexpr (WBITS == 8) wgmma::proxy_fence();
  __syncthreads();  // everyone's; and every warpgroup's step kt - 2 MMAs are complete (the wait of step kt - 1)
  const uint32_t stage = c.sbase + (kt % kStages) * S::kStage;
  uint32_t wtile = stage + S::kXBytes;
  if constexpr (WBITS == 4) {
    uint8_t* const ub = c.smem + (c.ubase - c.sbase) + (kt & 1) * kOpBytes;
    unpack_stage(c.smem + (stage - c.sbase) + S::kXBytes, ub);
    wtile = c.ubase + (kt & 1) * kOpBytes;
  }
  if (kt + kAhead < nk) load_stage<WBITS, T>(c.cp, kt + kAhead, c.sbase + ((kt + kAhead) % kStages) * S::kStage);
  mma::cp_async_commit();
  if constexpr (WBITS == 4) {
    wgmma::proxy_fence();
    __syncthreads();  // every thread's unpacked rows
  }
  issue_mmas<WBITS>(a, c, acc, kt, s_in_group == 0, stage, wtile);
  if constexpr (KG) {
    if (s_in_group == c.spg - 1) {  // the group's last step: wait for all of it, then fold
      wgmma::wait<0>();
      wgmma::reg_fence(acc.i);
      fold(acc.i, acc.f, acc.sc);
      return;
    }
  }
  wgmma::wait<1>();  // step kt - 1 is complete (its operand tiles)
#endif
}

// Configuration 2 (written after the device time of stop 34 ran out: compiled, not run; pick_config never takes
// it): the same tiles as configuration 0 with the CUDA-core work of a step under its MMAs. Step kt issues its
// MMAs, then, while they run, folds the K group that ended at step kt - 1 (from a register copy: ptxas serializes
// every wgmma when a non-wgmma instruction reads an in-flight accumulator, C7514), waits for stage kt + 1's copies,
// unpacks it into the other int8 tile and refills the ring three stages ahead; then waits for its MMAs (copying
// the accumulator out at a group's end) and meets the other warpgroup at one barrier. Shared-memory hazards:
//  - stage kt + 1's unpacked tile ub[(kt + 1) & 1] was last read by step kt - 1's MMAs: every warpgroup waited for
//    them before step kt - 1's closing barrier;
//  - the refill of step kt writes the ring slot of stage kt - 1 (kt + 3 mod 4), whose MMAs the same wait covered;
//    stage kt's slot, read by the MMAs in flight, is not touched;
//  - everyone's copies of stage kt + 1 are visible after the barrier that opens its unpack (each thread waited for
//    its own first); the unpacked rows and the copies reach the MMAs' async proxy through each thread's proxy fence
//    before the closing barrier.
template <bool KG, int T>
struct PipeAcc : Acc<KG, T> {
  uint32_t held[KG ? Acc<KG, T>::kN : 1];  // a finished K group's int32 tile, folded under the next step's MMAs
  float held_sc[2];
};

template <int WBITS, int T>
__device__ __forceinline__ void prepare_stage(const Ctx& c, int j, int nk) {
  using S = Smem<WBITS, T>;
  // stage j's copies, this thread's: committed groups are stages 0 .. j + 1 (or fewer at the end, as empty groups)
  mma::cp_async_wait<1>();
  __syncthreads();  // everyone's copies of stage j; everyone's MMAs of step j - 2 complete (ub[j & 1], its slot)
  if constexpr (WBITS == 4) {
    const uint32_t stage = c.sbase + (j % kStages) * S::kStage;
    unpack_stage(c.smem + (stage - c.sbase) + S::kXBytes, c.smem + (c.ubase - c.sbase) + (j & 1) * kOpBytes);
  }
  if (j + 2 < nk) load_stage<WBITS, T>(c.cp, j + 2, c.sbase + ((j + 2) % kStages) * S::kStage);
  mma::cp_async_commit();
#ifdef ZQ_WGMMA
  wgmma::proxy_fence();
#endif
}

template <int WBITS, bool KG, int T>
__device__ __forceinline__ void step_pipe(const zq_gemm_args& a, const Ctx& c, PipeAcc<KG, T>& acc, int kt, int nk,
                                          bool& held) {
#ifdef ZQ_WGMMA
  using S = Smem<WBITS, T>;
  const int s_in_group = kt % c.spg;
  const bool first = s_in_group == 0;
  const uint32_t stage = c.sbase + (kt % kStages) * S::kStage;
  const uint32_t wtile = WBITS == 4 ? c.ubase + (kt & 1) * kOpBytes : stage + S::kXBytes;
  issue_mmas<WBITS>(a, c, acc, kt, first, stage, wtile);
  if constexpr (KG) {
    if (held) {  // the group that ended at step kt - 1, under this step's MMAs
      fold(acc.held, acc.f, acc.held_sc);
      held = false;
    }
  }
  if (kt + 1 < nk) prepare_stage<WBITS, T>(c, kt + 1, nk);
  wgmma::wait<0>();
  wgmma::reg_fence(acc.i);
  if constexpr (KG) {
    if (s_in_group == c.spg - 1) {
#pragma unroll
      for (int e = 0; e < Acc<KG, T>::kN; ++e) acc.held[e] = acc.i[e];
      acc.held_sc[0] = acc.sc[0], acc.held_sc[1] = acc.sc[1];
      held = true;
    }
  }
  __syncthreads();  // everyone's stage kt + 1 (unpacked, landed) visible; everyone's step kt MMAs complete
#endif
}

template <class T> struct Pair;
template <> struct Pair<__half> { using type = __half2; };
template <> struct Pair<__nv_bfloat16> { using type = __nv_bfloat162; };

// Rows of out from the staged tile: 64 threads a token (a pair of columns each), 4 tokens a pass.
template <int kAct, int T, class OutT>
__device__ __forceinline__ void store_tile(const zq_gemm_args& a, const Ctx& c, const float* tile) {
  using P = typename Pair<OutT>::type;
  const auto* bias = static_cast<const OutT*>(a.bias);
  const auto* residual = static_cast<const OutT*>(a.residual);
  auto* out = static_cast<OutT*>(a.out);
  const int col = 2 * (threadIdx.x & 63);
  const int64_t n = c.n0 + col;
  float2 b = make_float2(0.f, 0.f);
  if (bias) b = make_float2(to_f<OutT>(bias[n]), to_f<OutT>(bias[n + 1]));
  for (int tr = threadIdx.x >> 6; tr < T; tr += kThreads / 64) {
    const int64_t m = c.m0 + tr;
    if (m >= a.m) break;
    const float xs = a.x_scale[m];
    const float2 v = *reinterpret_cast<const float2*>(tile + tr * kOutPitch + col);
    // the reference's order: ((acc * w_scale) * x_scale + bias) -> act -> + residual
    float v0 = apply_act(v.x * xs + b.x, kAct), v1 = apply_act(v.y * xs + b.y, kAct);
    if (residual) {
      const P r = *reinterpret_cast<const P*>(residual + m * a.n + n);
      v0 += to_f<OutT>(r.x), v1 += to_f<OutT>(r.y);
    }
    P o;
    o.x = from_f<OutT>(v0), o.y = from_f<OutT>(v1);
    *reinterpret_cast<P*>(out + m * a.n + n) = o;
  }
}

template <int WBITS, bool KG, bool kPipe, int T, class OutT>
__global__ void __launch_bounds__(kThreads, 128 / T) gemm_wgmma_kernel(const zq_gemm_args a) {
  zq::pdl_begin();
#ifdef ZQ_WGMMA
  using S = Smem<WBITS, T>;
  constexpr float kUnscale = WBITS == 4 ? 1.f / 16 : 1.f;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* const smem = smem_raw + ((1024 - (mma::smem_addr(smem_raw) & 1023)) & 1023);
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3, g = lane >> 2, t = lane & 3;
  const int nk = (int)(a.k / kBK);
  Ctx c;
  c.n0 = (int64_t)blockIdx.x * kW, c.m0 = (int64_t)blockIdx.y * T;
  c.smem = smem;
  c.sbase = mma::smem_addr(smem);
  c.ubase = c.sbase + kStages * S::kStage;
  c.wg = threadIdx.x >> 7;
  c.row = 64 * c.wg + 16 * warp + g;
  c.spg = KG ? (int)(a.k / a.groups / kBK) : nk;
  c.cp = copy_plan<WBITS, T>(a, c.m0, c.n0);

  std::conditional_t<kPipe, PipeAcc<KG, T>, Acc<KG, T>> acc;
#pragma unroll
  for (int e = 0; e < Acc<KG, T>::kN; ++e) {
    acc.i[e] = 0u;
    if constexpr (KG) acc.f[e] = 0.f;
  }
  if constexpr (kPipe) {
    // stages 0 and 1 in flight, then stage 0 prepared (unpacked, stage 2 in flight) before the first MMAs
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      if (q < nk) load_stage<WBITS, T>(c.cp, q, c.sbase + q * S::kStage);
      mma::cp_async_commit();
    }
    prepare_stage<WBITS, T>(c, 0, nk);
    __syncthreads();
    bool held = false;
    for (int kt = 0; kt < nk; ++kt) step_pipe<WBITS, KG, T>(a, c, acc, kt, nk, held);
    if constexpr (KG) {
      if (held) fold(acc.held, acc.f, acc.held_sc);
    }
  } else {
#pragma unroll
    for (int q = 0; q < kAhead; ++q) {
      if (q < nk) load_stage<WBITS, T>(c.cp, q, c.sbase + q * S::kStage);
      mma::cp_async_commit();
    }
    for (int kt = 0; kt < nk; ++kt) step<WBITS, KG, T>(a, c, acc, kt, nk, kt % c.spg);
  }
  wgmma::wait<0>();
  wgmma::reg_fence(acc.i);

  // The tile, [token][row] fp32 dequantized by the weight scales, over the stages (every copy and MMA is done).
  mma::cp_async_wait<0>();
  __syncthreads();
  auto* tile = reinterpret_cast<float*>(smem);
  float ws[2] = {1.f, 1.f};
  if constexpr (!KG)
#pragma unroll
    for (int h = 0; h < 2; ++h) ws[h] = a.w_scale[c.n0 + c.row + 8 * h] * kUnscale;
#pragma unroll
  for (int j = 0; j < T / 8; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int e = 4 * j + r;
      const float v = KG ? acc.f[e] : (float)(int)acc.i[e] * ws[r >> 1];
      tile[(8 * j + 2 * t + (r & 1)) * kOutPitch + c.row + 8 * (r >> 1)] = v;
    }
  __syncthreads();
#define ZQ_WGMMA_STORE(ACT) store_tile<ACT, T, OutT>(a, c, tile)
  switch (a.act) {
    case ZQ_ACT_GELU: ZQ_WGMMA_STORE(ZQ_ACT_GELU); break;
    case ZQ_ACT_GELU_TANH: ZQ_WGMMA_STORE(ZQ_ACT_GELU_TANH); break;
    case ZQ_ACT_RELU: ZQ_WGMMA_STORE(ZQ_ACT_RELU); break;
    case ZQ_ACT_SILU: ZQ_WGMMA_STORE(ZQ_ACT_SILU); break;
    default: ZQ_WGMMA_STORE(ZQ_ACT_NONE);
  }
#undef ZQ_WGMMA_STORE
#endif
}

template <int T, bool kPipe>
struct Launch {
  template <int WBITS, bool KG, class OutT>
  static cudaError_t run(const zq_gemm_args& a, cudaStream_t stream) {
    constexpr int smem = Smem<WBITS, T>::kBytes;
    auto* kernel = gemm_wgmma_kernel<WBITS, KG, kPipe, T, OutT>;
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    const int64_t m_tiles = (a.m + T - 1) / T;
    return zq::launch(kernel, dim3((unsigned)(a.n / kW), (unsigned)m_tiles), dim3(kThreads), smem, stream, a);
  }
};

constexpr int kNumConfigs = 3;  // 0: 128 tokens a block (one block an SM), 1: 64 (two), 2: 128, pipelined

// 64 tokens a block where K is short or the 128-token grid would leave more than half the SMs idle, else 128: on the
// H200 table (bench/results/gemm_wgmma_NVIDIA_H200.md, the BERT / Llama MLP shapes at M = 256-16384) within 7 % of
// the faster configuration on every row.
inline int pick_config(int64_t m, int64_t n, int64_t k, int sm_count) {
  const int64_t grid128 = (n / kW) * ((m + 127) / 128);
  return k <= 2048 || 2 * grid128 < sm_count ? 1 : 0;
}

}  // namespace zq::wgmma_gemm

ZQ_API cudaError_t zq_gemm_wgmma_config(const zq_gemm_args* a, int cfg, cudaStream_t stream) {
  using namespace zq::wgmma_gemm;
  using zq::misaligned;
  if (a->m < 0 || a->n < 0 || a->k < 0) return cudaErrorInvalidValue;
  const int64_t group_k = a->groups > 0 ? a->k / a->groups : 0;
  if (!a->x_is_int8 || a->w_fp8 || (a->w_bits != 8 && a->w_bits != 4) ||
      (a->out_dt != ZQ_F16 && a->out_dt != ZQ_BF16) || a->k == 0 || a->k % kBK || a->n % kW || a->groups < 1 ||
      a->k % a->groups || group_k % kBK || group_k > kMaxGroupK || !a->x_scale || !a->w_scale ||
      misaligned(a->x, 16) || misaligned(a->wq, 16) || misaligned(a->out, 4) || misaligned(a->residual, 4))
    return cudaErrorNotSupported;
  if ((a->m + 63) / 64 > 65535) return cudaErrorNotSupported;  // the grid's y (the 64-token configuration's tiles)
  zq::DeviceInfo dev;
  if (!zq::current_device_info(&dev)) return cudaErrorInvalidDevice;
  if (dev.cc_major != 9) return cudaErrorNotSupported;
  if (cfg >= kNumConfigs) return cudaErrorInvalidValue;
  if (a->m == 0 || a->n == 0) return cudaSuccess;
  if (cfg < 0) cfg = pick_config(a->m, a->n, a->k, dev.sm_count);
  if (cfg == 2) return zq::launch_by_type<Launch<128, true>>(*a, stream);
  return cfg == 0 ? zq::launch_by_type<Launch<128, false>>(*a, stream)
                  : zq::launch_by_type<Launch<64, false>>(*a, stream);
}

ZQ_API cudaError_t zq_gemm_wgmma(const zq_gemm_args* a, cudaStream_t stream) {
  return zq_gemm_wgmma_config(a, -1, stream);
}

ZQ_API int zq_gemm_wgmma_num_configs(void) { return zq::wgmma_gemm::kNumConfigs; }
