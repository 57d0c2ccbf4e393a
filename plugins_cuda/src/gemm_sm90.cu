// Entry points of the Hopper INT8 and FP8 GEMMs: argument checks, the tile-configuration choice, dispatch by
// input type, output type and residual.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "device_info.h"
#include "gemm_launch.h"
#include "gemm_sm90.cuh"

namespace zq::sm90 {

// The default configuration. INT8, from bench/results (H200, 2026-11-26): the 64x128 tile until the 128x128 tile
// grid covers every SM twice (more, smaller tiles balance better on short problems), then 128x128 ping-pong with
// 2x1 clusters; the 256x128 cooperative tile (cfg 2) was never clearly faster. FP8 takes the same rule over its
// table of the same shape (0: 64x128 ping-pong, 1: 128x128 cooperative, 2x1 clusters), not yet measured:
// bench/bench_fp8_gemm.py times every configuration.
int pick_config(int64_t m, int64_t n, int sm_count) {
  const int64_t tiles_128 = ((m + 127) / 128) * ((n + 127) / 128);
  return tiles_128 < 2 * (int64_t)sm_count ? 0 : 1;
}

// What both kernels need beyond their operand types: one scale per weight row, 16-byte rows, sizes within the int
// problem shape, fp16/bf16 out.
bool shape_contract(const zq_gemm_args& a) {
  return a.w_bits == 8 && a.groups == 1 && a.k % 16 == 0 && a.m <= INT32_MAX && a.n <= INT32_MAX &&
         a.k <= INT32_MAX && (a.out_dt == ZQ_F16 || a.out_dt == ZQ_BF16);
}

// TMA-aligned x, wq, out and residual; a naturally aligned bias; both scales present.
bool pointer_contract(const zq_gemm_args& a) {
  return a.x_scale && a.w_scale && !misaligned(a.x, 16) && !misaligned(a.wq, 16) && !misaligned(a.out, 16) &&
         !misaligned(a.residual, 16) && !misaligned(a.bias, 2);
}

template <class ElementIn>
cudaError_t run(const zq_gemm_args& a, int cfg, cudaStream_t stream) {
  if (a.m == 0 || a.n == 0) return cudaSuccess;
  if (!pointer_contract(a)) return cudaErrorNotSupported;
  DeviceInfo dev;
  if (!current_device_info(&dev)) return cudaErrorInvalidDevice;
  const int sms = dev.sm_count, device = dev.device;
  if (cfg < 0) cfg = pick_config(a.m, a.n, sms);
  if (cfg >= kNumConfigs<ElementIn>) return cudaErrorInvalidValue;
  const bool res = a.residual != nullptr;
  if (a.out_dt == ZQ_F16)
    return res ? run_config<ElementIn, cutlass::half_t, true>(cfg, a, sms, device, stream)
               : run_config<ElementIn, cutlass::half_t, false>(cfg, a, sms, device, stream);
  return res ? run_config<ElementIn, cutlass::bfloat16_t, true>(cfg, a, sms, device, stream)
             : run_config<ElementIn, cutlass::bfloat16_t, false>(cfg, a, sms, device, stream);
}

}  // namespace zq::sm90

ZQ_API int zq_has_sm90_gemm(void) { return 1; }

// cfg < 0 picks the configuration; 0..kNumConfigs-1 forces one (benchmarks and tests).
ZQ_API cudaError_t zq_gemm_sm90_config(const zq_gemm_args* a, int cfg, cudaStream_t stream) {
  using namespace zq::sm90;
  if (!a->x_is_int8 || a->w_fp8 || a->n % 8 || !shape_contract(*a)) return cudaErrorNotSupported;
  return run<int8_t>(*a, cfg, stream);
}

ZQ_API cudaError_t zq_gemm_sm90(const zq_gemm_args* a, cudaStream_t stream) { return zq_gemm_sm90_config(a, -1, stream); }

ZQ_API int zq_gemm_sm90_num_configs(void) { return zq::sm90::kNumConfigs<int8_t>; }

ZQ_API cudaError_t zq_gemm_sm90_fp8_config(const zq_gemm_args* a, int cfg, cudaStream_t stream) {
  using namespace zq::sm90;
  if (a->x_is_int8 || !a->w_fp8 || a->x_dt != ZQ_FP8_E4M3 || a->n % 16 || !shape_contract(*a))
    return cudaErrorNotSupported;
  return run<cutlass::float_e4m3_t>(*a, cfg, stream);
}

ZQ_API cudaError_t zq_gemm_sm90_fp8(const zq_gemm_args* a, cudaStream_t stream) {
  return zq_gemm_sm90_fp8_config(a, -1, stream);
}

ZQ_API int zq_gemm_sm90_fp8_num_configs(void) { return zq::sm90::kNumConfigs<cutlass::float_e4m3_t>; }
