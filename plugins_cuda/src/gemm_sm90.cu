// Entry points of the Hopper INT8 GEMM: argument checks, the tile-configuration choice, dispatch by output
// type and residual.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "device_info.h"
#include "gemm_sm90.cuh"

namespace zq::sm90 {

// The default configuration, from bench/results (H200, 2026-11-26): the 64x128 tile until the 128x128 tile
// grid covers every SM twice (more, smaller tiles balance better on short problems), then 128x128
// ping-pong with 2x1 clusters. The 256x128 cooperative tile (cfg 2) was never clearly faster.
int pick_config(int64_t m, int64_t n, int sm_count) {
  const int64_t tiles_128 = ((m + 127) / 128) * ((n + 127) / 128);
  return tiles_128 < 2 * (int64_t)sm_count ? 0 : 1;
}

}  // namespace zq::sm90

ZQ_API int zq_has_sm90_gemm(void) { return 1; }

// cfg < 0 picks the configuration; 0..kNumConfigs-1 forces one (benchmarks and tests).
ZQ_API cudaError_t zq_gemm_sm90_config(const zq_gemm_args* a, int cfg, cudaStream_t stream) {
  using namespace zq::sm90;
  if (!a->x_is_int8 || a->w_bits != 8 || a->groups != 1 || a->k % 16 || a->n % 8 || a->m > INT32_MAX ||
      a->n > INT32_MAX || a->k > INT32_MAX || (a->out_dt != ZQ_F16 && a->out_dt != ZQ_BF16))
    return cudaErrorNotSupported;
  if (a->m == 0 || a->n == 0) return cudaSuccess;
  zq::DeviceInfo dev;
  if (!zq::current_device_info(&dev)) return cudaErrorInvalidDevice;
  const int sms = dev.sm_count, device = dev.device;
  if (cfg < 0) cfg = pick_config(a->m, a->n, sms);
  if (cfg >= kNumConfigs) return cudaErrorInvalidValue;
  const bool res = a->residual != nullptr;
  if (a->out_dt == ZQ_F16)
    return res ? run_config<cutlass::half_t, true>(cfg, *a, sms, device, stream)
               : run_config<cutlass::half_t, false>(cfg, *a, sms, device, stream);
  return res ? run_config<cutlass::bfloat16_t, true>(cfg, *a, sms, device, stream)
             : run_config<cutlass::bfloat16_t, false>(cfg, *a, sms, device, stream);
}

ZQ_API cudaError_t zq_gemm_sm90(const zq_gemm_args* a, cudaStream_t stream) { return zq_gemm_sm90_config(a, -1, stream); }

ZQ_API int zq_gemm_sm90_num_configs(void) { return zq::sm90::kNumConfigs; }
