// Hopper INT8 GEMM instances for cutlass::half_t output, residual=true (one translation unit per variant so the
// heavy CUTLASS templates compile in parallel).
#include "gemm_sm90.cuh"

namespace zq::sm90 {
template <>
cudaError_t run_config<cutlass::half_t, true>(int cfg, const zq_gemm_args& a, int sm_count, int device, cudaStream_t stream) {
  return run_config_impl<cutlass::half_t, true>(cfg, a, sm_count, device, stream);
}
}  // namespace zq::sm90
