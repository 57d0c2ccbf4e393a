// Launch policy shared by every kernel family: programmatic dependent launch (zq/launch.cuh).
#include "device_info.h"
#include "zq/common.h"
#include "zq/launch.cuh"

namespace zq {

static int g_pdl = -1;  // zq_set_pdl

bool pdl_enabled() {
  if (g_pdl == 0) return false;
  DeviceInfo dev;
  return current_device_info(&dev) && dev.cc_major >= 9;
}

}  // namespace zq

ZQ_API void zq_set_pdl(int mode) { zq::g_pdl = mode < 0 ? -1 : (mode > 0 ? 1 : 0); }
