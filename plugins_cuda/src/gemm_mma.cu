// INT8 tensor-core GEMM for sm_80 and later (A100, Hopper; mma.sync, no wgmma/TMA): int8 activations times INT8
// or packed INT4 weights, one scale per weight row or per K group, the dequantization epilogue of gemm.h fused.
// A block computes a BM x BN tile of out through a STAGES-deep cp.async pipeline of kBK-wide k slices of x and
// the weight. INT4 weights travel and sit in shared memory packed (half the bytes) and are unpacked in registers
// right before the mma. Each thread keeps an int32 accumulator per fragment; with K-group scales it is folded
// into an fp32 accumulator (facc += float(iacc) * w_scale[n, g]) at every group end, which falls on a k32 mma
// step because group_k % 32 == 0 (a kBK slice may hold two groups).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gemm_launch.h"
#include "mma_sm80.cuh"
#include "zq/device_math.cuh"
#include "zq/gemm.h"

namespace zq::mma {

constexpr int kBK = 64;  // k per pipeline stage: two m16n8k32 steps
// Shared-memory row strides in bytes. The 16-byte pad puts 8 consecutive int8 rows (80 B apart) in 8 distinct
// 16-byte bank groups, so every ldmatrix phase is conflict-free; packed INT4 rows (48 B apart) put the 8 rows'
// 16-bit fragment loads in distinct banks.
constexpr int kRow8 = kBK + 16;
constexpr int kRow4 = kBK / 2 + 16;
// |x * w| <= 128 * 128 = 2^14 (the INT4 codes scaled by 16 too): a group of 2^16 terms sums to at most 2^30 in
// int32 (2^17 terms could reach 2^31, one past INT32_MAX).
constexpr int64_t kMaxGroupK = 65536;

template <int BM_, int BN_, int WARPS_M, int WARPS_N, int STAGES_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, STAGES = STAGES_, kWarpsN = WARPS_N;
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
  static constexpr int MT = WM / 16, NT = WN / 8;             // m16n8 mma tiles per warp
  static_assert(WM % 16 == 0 && WN % 8 == 0, "a warp tile is whole m16n8 tiles");
  static_assert(BM * kBK / 16 % kThreads == 0 && BN * kBK / 32 % kThreads == 0, "whole 16-byte copies per thread");
  template <int WBITS> static constexpr int b_row() { return WBITS == 8 ? kRow8 : kRow4; }
  template <int WBITS> static constexpr int smem_bytes() { return STAGES * (BM * kRow8 + BN * b_row<WBITS>()); }
};

// The tile configurations, in one table (index = zq_gemm_mma_config's cfg): BM, BN, warps along M and N, stages.
#define ZQ_MMA_CONFIGS(X) \
  X(0, 128, 128, 2, 4, 4) \
  X(1, 64, 128, 2, 4, 4)  \
  X(2, 64, 64, 2, 2, 4)   \
  X(3, 32, 64, 1, 4, 4)
constexpr int kNumConfigs = 4;

template <class T> struct Pair;
template <> struct Pair<__half> { using type = __half2; };
template <> struct Pair<__nv_bfloat16> { using type = __nv_bfloat162; };

template <class T> __device__ __forceinline__ float2 load_pair(const T* p) {
  const auto h = *reinterpret_cast<const typename Pair<T>::type*>(p);
  return make_float2(to_f<T>(h.x), to_f<T>(h.y));
}
template <class T> __device__ __forceinline__ void store_pair(T* p, float v0, float v1) {
  typename Pair<T>::type h;
  h.x = from_f<T>(v0);
  h.y = from_f<T>(v1);
  *reinterpret_cast<typename Pair<T>::type*>(p) = h;
}

// Start copying k slice kt of the block's x rows and weight rows into one pipeline stage; rows past M / N and
// k past K are zero-filled.
template <class Cfg, int WBITS>
__device__ __forceinline__ void load_stage(const zq_gemm_args& a, int64_t m0, int64_t n0, int kt, uint8_t* sa,
                                           uint8_t* sb) {
  const int64_t k0 = (int64_t)kt * kBK;
  const auto* x = static_cast<const int8_t*>(a.x);
  constexpr int kChunksA = Cfg::BM * kBK / 16;
#pragma unroll
  for (int i = 0; i < kChunksA / Cfg::kThreads; ++i) {
    const int c = threadIdx.x + i * Cfg::kThreads, r = c / (kBK / 16), col = c % (kBK / 16);
    const int64_t m = m0 + r, k = k0 + 16 * col;
    const bool ok = m < a.m && k < a.k;
    cp_async_16(smem_addr(sa + r * kRow8 + 16 * col), ok ? x + m * a.k + k : x, ok);
  }
  const auto* w = static_cast<const uint8_t*>(a.wq);
  constexpr int kPerChunk = 16 * 8 / WBITS, kChunksRow = kBK / kPerChunk;  // k values per 16 bytes
  const int64_t wrow = a.k * WBITS / 8;
#pragma unroll
  for (int i = 0; i < Cfg::BN * kChunksRow / Cfg::kThreads; ++i) {
    const int c = threadIdx.x + i * Cfg::kThreads, r = c / kChunksRow, col = c % kChunksRow;
    const int64_t n = n0 + r, k = k0 + kPerChunk * col;
    const bool ok = n < a.n && k < a.k;
    cp_async_16(smem_addr(sb + r * Cfg::template b_row<WBITS>() + 16 * col), ok ? w + n * wrow + k * WBITS / 8 : w,
                ok);
  }
}

// The B fragments of both k32 steps of a stage, bf[j][step], for the warp's n8 tiles j (rows wn + 8j ..).
template <class Cfg, int WBITS>
__device__ __forceinline__ void load_b(const uint8_t* sb, int wn, uint32_t (&bf)[Cfg::NT][2][2]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < Cfg::NT; ++j) {
    if constexpr (WBITS == 8) {
      // matrix q = lane / 8 is the 16-byte column q of the 8 rows: k 0-15, 16-31 (step 0), 32-47, 48-63 (step 1)
      uint32_t d[4];
      ldmatrix_x4(d, smem_addr(sb + (wn + 8 * j + (lane & 7)) * kRow8 + 16 * (lane >> 3)));
      bf[j][0][0] = d[0], bf[j][0][1] = d[1], bf[j][1][0] = d[2], bf[j][1][1] = d[3];
    } else {
      // b0 = k 32s + 4t .. +3 = packed bytes 16s + 2t, +1; b1 = k 32s + 16 + 4t .. = bytes 16s + 8 + 2t, +1
      const auto* row = reinterpret_cast<const uint16_t*>(sb + (wn + 8 * j + (lane >> 2)) * kRow4);
      const int t = lane & 3;
#pragma unroll
      for (int s = 0; s < 2; ++s)
        unpack_int4x16((uint32_t)row[8 * s + t] | ((uint32_t)row[8 * s + 4 + t] << 16), bf[j][s]);
    }
  }
}

// K groups: facc += float(iacc) * sc at a group end, iacc = 0. kFast converts through the float bit pattern
// (IADD + FADD at full rate, exact for |iacc| < 2^22, i.e. group_k <= 128); I2F runs at a quarter of the FMA
// rate and, once every group_k / 32 mma steps for all accumulators, would bound the mainloop.
template <bool kFast, int MT, int NT>
__device__ __forceinline__ void fold_group(int (&iacc)[MT][NT][4], float (&facc)[MT][NT][4], const float (&sc)[NT][2]) {
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const float v = kFast ? __int_as_float(0x4B400000 + iacc[i][j][r]) - 12582912.f : (float)iacc[i][j][r];
        facc[i][j][r] = fmaf(v, sc[j][r & 1], facc[i][j][r]);
        iacc[i][j][r] = 0;
      }
}

// The epilogue, with the activation a compile-time constant (one branch per block instead of apply_act's switch
// per element): c[2h + e] of a fragment is row g + 8h, column 2t + e of its m16n8 tile.
template <int kAct, class Cfg, bool KG, class OutT>
__device__ __forceinline__ void store_tile(const zq_gemm_args& a, int64_t m0, int64_t n0, int wm, int wn,
                                           const int (&iacc)[Cfg::MT][Cfg::NT][4],
                                           const float (&facc)[Cfg::MT][Cfg::NT][4], float unscale) {
  constexpr int MT = Cfg::MT, NT = Cfg::NT;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const auto* bias = static_cast<const OutT*>(a.bias);
  const auto* residual = static_cast<const OutT*>(a.residual);
  auto* out = static_cast<OutT*>(a.out);
  float xs[MT][2];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + wm + 16 * i + g + 8 * h;
      xs[i][h] = m < a.m ? a.x_scale[m] : 0.f;
    }
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int64_t n = n0 + wn + 8 * j + 2 * t;  // n even and N % 8 == 0: n < N means n + 1 < N
    if (n >= a.n) continue;
    float2 ws = make_float2(1.f, 1.f), b = make_float2(0.f, 0.f);
    if constexpr (!KG) ws = make_float2(a.w_scale[n] * unscale, a.w_scale[n + 1] * unscale);
    if (bias) b = make_float2(to_f<OutT>(bias[n]), to_f<OutT>(bias[n + 1]));
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = m0 + wm + 16 * i + g + 8 * h;
        if (m >= a.m) continue;
        float v0, v1;  // the reference's order: ((acc * w_scale) * x_scale + bias) -> act -> + residual
        if constexpr (KG) v0 = facc[i][j][2 * h], v1 = facc[i][j][2 * h + 1];
        else v0 = (float)iacc[i][j][2 * h] * ws.x, v1 = (float)iacc[i][j][2 * h + 1] * ws.y;
        v0 = apply_act(v0 * xs[i][h] + b.x, kAct);
        v1 = apply_act(v1 * xs[i][h] + b.y, kAct);
        if (residual) {
          const float2 r = load_pair(residual + m * a.n + n);
          v0 += r.x, v1 += r.y;
        }
        store_pair(out + m * a.n + n, v0, v1);
      }
  }
}

template <class Cfg, int WBITS, bool KG, class OutT>
__global__ void __launch_bounds__(Cfg::kThreads) gemm_mma_kernel(const zq_gemm_args a) {
  zq::pdl_begin();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int MT = Cfg::MT, NT = Cfg::NT, STAGES = Cfg::STAGES;
  constexpr int kStageA = Cfg::BM * kRow8, kStageB = Cfg::BN * Cfg::template b_row<WBITS>();
  constexpr float kUnscale = WBITS == 4 ? 1.f / 16 : 1.f;  // undoes unpack_int4x16's factor 16 (exact)
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* const sa = smem;
  uint8_t* const sb = smem + STAGES * kStageA;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = lane & 3;
  const int wm = (warp / Cfg::kWarpsN) * Cfg::WM, wn = (warp % Cfg::kWarpsN) * Cfg::WN;
  const int64_t m0 = (int64_t)blockIdx.y * Cfg::BM, n0 = (int64_t)blockIdx.x * Cfg::BN;
  const int k_tiles = (int)((a.k + kBK - 1) / kBK);

  int iacc[MT][NT][4];
  float facc[MT][NT][4];  // K groups only
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) iacc[i][j][r] = 0, facc[i][j][r] = 0.f;
  const int steps_per_group = KG ? (int)(a.k / a.groups / 32) : 0;
  const bool fast_fold = steps_per_group <= 4;  // |iacc| <= 128 * 2^14 = 2^21
  int steps_left = steps_per_group, group = 0;  // k32 steps left in the current K group, and its index

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load_stage<Cfg, WBITS>(a, m0, n0, s, sa + s * kStageA, sb + s * kStageB);
    cp_async_commit();  // empty groups too: the wait below counts groups
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();  // this thread's copies of slice kt have landed
    // ... and everyone's; and every warp is done with slice kt - 1, whose stage the next copy overwrites.
    __syncthreads();
    const int next = kt + STAGES - 1;
    if (next < k_tiles)
      load_stage<Cfg, WBITS>(a, m0, n0, next, sa + (next % STAGES) * kStageA, sb + (next % STAGES) * kStageB);
    cp_async_commit();

    const uint8_t* sa_kt = sa + (kt % STAGES) * kStageA;
    uint32_t bf[NT][2][2];
    load_b<Cfg, WBITS>(sb + (kt % STAGES) * kStageB, wn, bf);
    const int steps = a.k - (int64_t)kt * kBK >= kBK ? 2 : 1;  // K % 32 == 0: the last slice may hold one step
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      if (s >= steps) break;
      const bool fold = KG && steps_left == 1;
      float sc[NT][2];
      if (fold) {  // issued before the mma so their latency hides under it
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int64_t n = n0 + wn + 8 * j + 2 * t + e;
            sc[j][e] = n < a.n ? __ldg(a.w_scale + n * a.groups + group) * kUnscale : 0.f;
          }
      }
      uint32_t af[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i)  // matrices: rows 0-7 / 8-15 (lane bit 3) x k 0-15 / 16-31 (lane bit 4)
        ldmatrix_x4(af[i], smem_addr(sa_kt + (wm + 16 * i + (lane & 15)) * kRow8 + 32 * s + 16 * (lane >> 4)));
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_s8(iacc[i][j], af[i], bf[j][s]);
      if constexpr (KG) {
        if (fold) {
          if (fast_fold) fold_group<true>(iacc, facc, sc);
          else fold_group<false>(iacc, facc, sc);
          steps_left = steps_per_group;
          ++group;
        } else {
          --steps_left;
        }
      }
    }
  }
  cp_async_wait<0>();

#define ZQ_MMA_STORE(ACT) store_tile<ACT, Cfg, KG, OutT>(a, m0, n0, wm, wn, iacc, facc, kUnscale)
  switch (a.act) {
    case ZQ_ACT_GELU: ZQ_MMA_STORE(ZQ_ACT_GELU); break;
    case ZQ_ACT_GELU_TANH: ZQ_MMA_STORE(ZQ_ACT_GELU_TANH); break;
    case ZQ_ACT_RELU: ZQ_MMA_STORE(ZQ_ACT_RELU); break;
    case ZQ_ACT_SILU: ZQ_MMA_STORE(ZQ_ACT_SILU); break;
    default: ZQ_MMA_STORE(ZQ_ACT_NONE);  // apply_act's default too
  }
#undef ZQ_MMA_STORE
#endif
}

template <class Cfg, int WBITS, bool KG, class OutT>
cudaError_t launch(const zq_gemm_args& a, cudaStream_t stream) {
  const int64_t m_tiles = (a.m + Cfg::BM - 1) / Cfg::BM, n_tiles = (a.n + Cfg::BN - 1) / Cfg::BN;
  if (m_tiles > 65535 || n_tiles > INT32_MAX) return cudaErrorNotSupported;
  constexpr int smem = Cfg::template smem_bytes<WBITS>();
  auto* kernel = gemm_mma_kernel<Cfg, WBITS, KG, OutT>;
  if constexpr (smem > 48 * 1024) {  // opt in per launch (as CUTLASS does): cheap, and right on every device
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
  }
  return zq::launch(kernel, dim3((unsigned)n_tiles, (unsigned)m_tiles), dim3(Cfg::kThreads), smem, stream, a);
}

template <class Cfg>
struct Launch {
  template <int WBITS, bool KG, class OutT>
  static cudaError_t run(const zq_gemm_args& a, cudaStream_t stream) { return launch<Cfg, WBITS, KG, OutT>(a, stream); }
};

#define ZQ_MMA_CASE(id, BM, BN, WM, WN, ST) \
  case id: return launch_by_type<Launch<Tile<BM, BN, WM, WN, ST>>>(a, stream);
cudaError_t run_config(int cfg, const zq_gemm_args& a, cudaStream_t stream) {
  switch (cfg) {
    ZQ_MMA_CONFIGS(ZQ_MMA_CASE)
    default: return cudaErrorInvalidValue;
  }
}

// The largest tile whose grid still gives every SM a block, else the smallest tile (the most blocks): small and
// medium M need the parallelism more than the operand reuse of big tiles.
#define ZQ_MMA_TILES(id, BM, BN, WM, WN, ST) {BM, BN},
int pick_config(int64_t m, int64_t n, int sm_count) {
  constexpr int64_t tiles[kNumConfigs][2] = {ZQ_MMA_CONFIGS(ZQ_MMA_TILES)};
  for (int c = 0; c < kNumConfigs; ++c)
    if (((m + tiles[c][0] - 1) / tiles[c][0]) * ((n + tiles[c][1] - 1) / tiles[c][1]) >= sm_count) return c;
  return kNumConfigs - 1;
}

}  // namespace zq::mma

ZQ_API cudaError_t zq_gemm_mma_config(const zq_gemm_args* a, int cfg, cudaStream_t stream) {
  using namespace zq::mma;
  using zq::misaligned;
  if (a->m < 0 || a->n < 0 || a->k < 0) return cudaErrorInvalidValue;
  const int64_t group_k = a->groups > 0 ? a->k / a->groups : 0;
  if (!a->x_is_int8 || a->w_fp8 || (a->w_bits != 8 && a->w_bits != 4) ||
      (a->out_dt != ZQ_F16 && a->out_dt != ZQ_BF16) || a->k == 0 || a->k % 32 || a->n % 8 || a->groups < 1 ||
      a->k % a->groups || group_k % 32 || group_k > kMaxGroupK || !a->x_scale || !a->w_scale ||
      misaligned(a->x, 16) || misaligned(a->wq, 16) || misaligned(a->out, 4) || misaligned(a->residual, 4))
    return cudaErrorNotSupported;
  zq::DeviceInfo dev;
  if (const cudaError_t e = zq::sm80_device(cfg, kNumConfigs, &dev); e != cudaSuccess) return e;
  if (a->m == 0 || a->n == 0) return cudaSuccess;
  return run_config(cfg < 0 ? pick_config(a->m, a->n, dev.sm_count) : cfg, *a, stream);
}

ZQ_API cudaError_t zq_gemm_mma(const zq_gemm_args* a, cudaStream_t stream) { return zq_gemm_mma_config(a, -1, stream); }

ZQ_API int zq_gemm_mma_num_configs(void) { return zq::mma::kNumConfigs; }
