// Bias + activation (GeLU for BERT/GPT FC1 outputs, SiLU gating for Llama MLPs) with the token-wise
// quantization of the next GEMM's input fused in: one read of the row, the codes (INT8, or FP8 E4M3 from
// zq_act_quant_fp8) + scale written once.
// The vector path (zq/row_vec.cuh) keeps the row in registers; the scalar kernel (row cached in shared
// memory) takes unaligned pointers, K % 8 != 0 and very long rows. Both do the same per-element fp32 math.
#include "zq/act_quant.h"
#include "zq/device_math.cuh"
#include "zq/row_vec.cuh"

namespace zq {

template <class C, class T>
__global__ void act_quant_kernel(const T* __restrict__ x, const T* __restrict__ bias, const T* __restrict__ gate,
                                 int64_t k, int64_t ld, int act, int8_t* __restrict__ q, float* __restrict__ scale,
                                 T* __restrict__ out) {
  zq::pdl_begin();
  extern __shared__ float row[];
  __shared__ float red[32];
  const int64_t off = (int64_t)blockIdx.x * k, in = (int64_t)blockIdx.x * ld;
  float amax = 0.f;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    float v = to_f<T>(x[in + i]);
    if (bias) v = round_to<T>(v + to_f<T>(bias[i]));
    float y;
    if (gate) {
      y = round_to<T>(round_to<T>(apply_act(to_f<T>(gate[in + i]), act)) * v);
    } else {
      y = round_to<T>(apply_act(v, act));
    }
    row[i] = y;
    if (out) out[off + i] = from_f<T>(y);
    amax = fmaxf(amax, fabsf(y));
  }
  amax = fmaxf(block_max(amax, red), kEps);
  const float inv = code_inv<C>(amax);
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) q[off + i] = C::encode(row[i], inv);
  if (threadIdx.x == 0) scale[blockIdx.x] = amax / C::kMax;
}

// One row of the vector path with the activation fixed at compile time (the kernel switches on it once, not per
// element). Bias add and gating multiply run on the packs in T (add_raw / mul_raw: the reference's bits); the
// activation in fp32.
template <int kAct, class C, class T, int kRow, int kVecs>
__device__ __forceinline__ void act_quant_row(const T* __restrict__ x, const T* __restrict__ bias,
                                              const T* __restrict__ gate, const RowPos& p, int64_t k, int64_t ld,
                                              int8_t* __restrict__ q, float* __restrict__ scale,
                                              T* __restrict__ out, float* red) {
  const int64_t off = p.row * k, in = p.row * ld;
  const int k8 = (int)(k / kPack);
  Raw<T> yv[kVecs], gv[kVecs];  // x, then act(...) rounded to T; the gate (both loads in flight at once)
  load_held_row(x + in, p, k8, yv);
  if (gate) load_held_row(gate + in, p, k8, gv);
  float amax = 0.f;
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const int j = p.t + v * p.nthr;
    if (j < k8) {
      Raw<T> xv = yv[v];
      if (bias) xv = add_raw<T>(xv, load_raw(bias + (int64_t)j * kPack));
      float f[kPack];
      if (gate) {  // round(round(act(gate)) * x)
        unpack<T>(gv[v], f);
#pragma unroll
        for (int i = 0; i < kPack; ++i) f[i] = apply_act(f[i], kAct);
        yv[v] = mul_raw<T>(pack<T>(f), xv);
      } else {  // round(act(x))
        unpack<T>(xv, f);
#pragma unroll
        for (int i = 0; i < kPack; ++i) f[i] = apply_act(f[i], kAct);
        yv[v] = pack<T>(f);
      }
      if (out) store_raw(out + off + (int64_t)j * kPack, yv[v]);
      amax = abs_max_raw<T>(amax, yv[v]);
    }
  }
  quantize_held_row<C, T, kVecs, kRow>(yv, amax, p, k8, q + off, scale, red);
}

template <class C, class T, int kRow, int kVecs>
__global__ void __launch_bounds__(row_block_threads<T, kRow>())
act_quant_vec_kernel(const T* __restrict__ x, const T* __restrict__ bias, const T* __restrict__ gate,
                     int64_t rows, int64_t k, int64_t ld, int act, int8_t* __restrict__ q, float* __restrict__ scale,
                     T* __restrict__ out) {
  zq::pdl_begin();
  __shared__ float red[32];
  const RowPos p = row_pos<kRow>();
  if (p.row >= rows) return;  // a whole warp (warp rows); never taken with block or split rows
#define ZQ_ACT_ROW(A) \
  case A: act_quant_row<A, C, T, kRow, kVecs>(x, bias, gate, p, k, ld, q, scale, out, red); break;
  switch (act) {
    ZQ_ACT_ROW(ZQ_ACT_GELU) ZQ_ACT_ROW(ZQ_ACT_GELU_TANH) ZQ_ACT_ROW(ZQ_ACT_RELU) ZQ_ACT_ROW(ZQ_ACT_SILU)
    default: act_quant_row<ZQ_ACT_NONE, C, T, kRow, kVecs>(x, bias, gate, p, k, ld, q, scale, out, red);
  }
#undef ZQ_ACT_ROW
}

template <class C>
cudaError_t act_quant_codes(const void* x, const void* bias, const void* gate, zq_dtype dt, int64_t rows, int64_t k,
                            int64_t ld, int act, int8_t* q, float* scale, void* out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (k <= 0 || k > 56 * 1024 || rows > INT32_MAX || ld < k) return cudaErrorInvalidValue;
  RowLaunch l;
  // the vector path loads 16-byte packs: every row of x / gate must start aligned (ld a multiple of the pack)
  if (ld % kPack == 0 &&
      vec_row_launch(rows, k, max_row_threads(dt), {x, bias, gate, q, out}, &l, /*split_by_default=*/true)) {
    ZQ_DISPATCH_DTYPE(dt, T, ZQ_DISPATCH_ROW(l, return launch_row(
                                                    l, stream, act_quant_vec_kernel<C, T, kRow, kVecs>,
                                                    static_cast<const T*>(x), static_cast<const T*>(bias),
                                                    static_cast<const T*>(gate), rows, k, ld, act, q, scale,
                                                    static_cast<T*>(out))));
  }
  const size_t smem = (size_t)k * sizeof(float);
  ZQ_DISPATCH_DTYPE(dt, T, {
    auto kernel = act_quant_kernel<C, T>;
    if (smem > 48 * 1024) {
      cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
      if (e != cudaSuccess) return e;
    }
    return zq::launch(kernel, dim3((unsigned)rows), dim3(row_threads(k)), smem, stream, static_cast<const T*>(x),
                      static_cast<const T*>(bias), static_cast<const T*>(gate), k, ld, act, q, scale,
                      static_cast<T*>(out));
  });
  return cudaErrorInvalidValue;  // not reached: every dtype case returns
}

}  // namespace zq

ZQ_API cudaError_t zq_act_quant(const void* x, const void* bias, const void* gate, zq_dtype dt, int64_t rows,
                                int64_t k, int64_t ld, int act, int8_t* q, float* scale, void* out,
                                cudaStream_t stream) {
  return zq::act_quant_codes<zq::Int8Code>(x, bias, gate, dt, rows, k, ld, act, q, scale, out, stream);
}

ZQ_API cudaError_t zq_act_quant_fp8(const void* x, const void* bias, const void* gate, zq_dtype dt, int64_t rows,
                                    int64_t k, int64_t ld, int act, void* q, float* scale, void* out,
                                    cudaStream_t stream) {
  return zq::act_quant_codes<zq::Fp8Code>(x, bias, gate, dt, rows, k, ld, act, static_cast<int8_t*>(q), scale, out,
                                          stream);
}
