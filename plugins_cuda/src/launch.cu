// Launch policy shared by every kernel family: programmatic dependent launch (zq/launch.cuh).
#include "device_info.h"
#include "zq/common.h"
#include "zq/launch.cuh"

namespace zq {

static int g_pdl = -1;              // zq_set_pdl
static int64_t g_gemm_prefetch = -1;  // zq_set_gemm_prefetch

// Compiled like every kernel of the library (one architecture list), so its binary version says which code the
// current device runs.
__global__ void arch_probe_kernel() {
  zq::pdl_begin();
}

bool sm90_code() {
  DeviceInfo dev;
  if (!current_device_info(&dev) || dev.cc_major < 9) return false;
  static int version[64] = {};  // per device: 0 = not asked yet, -1 = unknown
  int& v = version[dev.device];
  if (v == 0) {
    cudaFuncAttributes fa;
    v = cudaFuncGetAttributes(&fa, reinterpret_cast<const void*>(arch_probe_kernel)) == cudaSuccess ? fa.binaryVersion
                                                                                                    : -1;
  }
  return v >= 90;
}

bool pdl_enabled() {
  if (g_pdl == 0) return false;
  DeviceInfo dev;
  return current_device_info(&dev) && dev.cc_major >= 9;
}

// The library's choice: none. Measured on the H200 (8B / 1B W8A8 decode, budgets of 1, 4, 12 and 25 MB against
// none in one process, bench/results/decode_scale_*_prefetch_sweep_H200.md) the prefetch never helped and cost
// 4-8 % from 12 MB: its traffic lands on the row kernel ahead, which is latency-bound and on the critical path.
int64_t gemm_prefetch_bytes() { return g_gemm_prefetch > 0 ? g_gemm_prefetch : 0; }

}  // namespace zq

ZQ_API void zq_set_pdl(int mode) { zq::g_pdl = mode < 0 ? -1 : (mode > 0 ? 1 : 0); }
ZQ_API void zq_set_gemm_prefetch(int64_t bytes) { zq::g_gemm_prefetch = bytes < 0 ? -1 : bytes; }
