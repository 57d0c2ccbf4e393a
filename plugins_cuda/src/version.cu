// Library identity: ABI version and which optional kernel families were compiled in.
#include "zq/common.h"

ZQ_API int zq_abi_version(void) { return ZQ_ABI_VERSION; }

#ifndef ZQ_WITH_SM90_GEMM
ZQ_API int zq_has_sm90_gemm(void) { return 0; }
#include "zq/gemm.h"
ZQ_API cudaError_t zq_gemm_sm90(const zq_gemm_args*, cudaStream_t) { return cudaErrorNotSupported; }
ZQ_API cudaError_t zq_gemm_sm90_config(const zq_gemm_args*, int, cudaStream_t) { return cudaErrorNotSupported; }
ZQ_API int zq_gemm_sm90_num_configs(void) { return 0; }
ZQ_API cudaError_t zq_gemm_sm90_fp8(const zq_gemm_args*, cudaStream_t) { return cudaErrorNotSupported; }
ZQ_API cudaError_t zq_gemm_sm90_fp8_config(const zq_gemm_args*, int, cudaStream_t) { return cudaErrorNotSupported; }
ZQ_API int zq_gemm_sm90_fp8_num_configs(void) { return 0; }
#endif

ZQ_API const char* zq_error_string(cudaError_t e) { return cudaGetErrorString(e); }
