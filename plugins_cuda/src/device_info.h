// Host-side facts about the current CUDA device that the GEMM entry points need (SM count for the tile choice,
// compute capability for the architecture check), read once per device.
#pragma once
#include <cuda_runtime.h>

namespace zq {

struct DeviceInfo {
  int device = 0;
  int sm_count = 0;
  int cc_major = 0;
};

// False when there is no current device (or its attributes cannot be read).
inline bool current_device_info(DeviceInfo* info) {
  static DeviceInfo cache[64];
  int d = 0;
  if (cudaGetDevice(&d) != cudaSuccess || d < 0 || d >= 64) return false;
  if (cache[d].sm_count == 0) {
    DeviceInfo i;
    i.device = d;
    if (cudaDeviceGetAttribute(&i.sm_count, cudaDevAttrMultiProcessorCount, d) != cudaSuccess ||
        cudaDeviceGetAttribute(&i.cc_major, cudaDevAttrComputeCapabilityMajor, d) != cudaSuccess)
      return false;
    cache[d] = i;
  }
  *info = cache[d];
  return info->sm_count > 0;
}

}  // namespace zq
