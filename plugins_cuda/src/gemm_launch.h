// Host-side pieces the sm80+ tensor-core GEMM entry points share (gemm_mma.cu, gemm_skinny.cu): the pointer
// alignment check of their contracts, the device / configuration checks after them, and the dispatch from a call's
// weight bits, K-group scales and output type to a kernel template.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "device_info.h"
#include "zq/gemm.h"

namespace zq {

inline bool misaligned(const void* p, uintptr_t bytes) { return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) != 0; }

// After an entry point's own contract: a current device (cudaErrorInvalidDevice), of compute capability 8.0 or
// later (cudaErrorNotSupported), and a configuration below num_configs (cudaErrorInvalidValue); else cudaSuccess
// with *dev filled.
inline cudaError_t sm80_device(int cfg, int num_configs, DeviceInfo* dev) {
  if (!current_device_info(dev)) return cudaErrorInvalidDevice;
  if (dev->cc_major < 8) return cudaErrorNotSupported;
  if (cfg >= num_configs) return cudaErrorInvalidValue;
  return cudaSuccess;
}

template <class Launch, class OutT, class... Extra>
cudaError_t launch_by_weights(const zq_gemm_args& a, cudaStream_t stream, const Extra&... extra) {
  const bool kg = a.groups > 1;
  if (a.w_bits == 4)
    return kg ? Launch::template run<4, true, OutT>(a, stream, extra...)
              : Launch::template run<4, false, OutT>(a, stream, extra...);
  return kg ? Launch::template run<8, true, OutT>(a, stream, extra...)
            : Launch::template run<8, false, OutT>(a, stream, extra...);
}

// Launch::template run<WBITS, KG, OutT>(a, stream, extra...) for a's w_bits (8 or 4), K groups (groups > 1) and
// out_dt (fp16, else bf16: the callers' contracts take only those).
template <class Launch, class... Extra>
cudaError_t launch_by_type(const zq_gemm_args& a, cudaStream_t stream, const Extra&... extra) {
  return a.out_dt == ZQ_F16 ? launch_by_weights<Launch, __half>(a, stream, extra...)
                            : launch_by_weights<Launch, __nv_bfloat16>(a, stream, extra...);
}

}  // namespace zq
