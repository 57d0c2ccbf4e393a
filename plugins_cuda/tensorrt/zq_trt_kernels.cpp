// The TensorRT plugins' kernel launches (zq_trt_kernels.h) implemented on the zq kernel library's C launch API
// (plugins_cuda/include/zq/*.h): the plugins run exactly the kernels the PyTorch engine runs. The enum values
// of zq_trt_kernels.h are the library's (FloatType = zq_dtype for fp32/fp16, Act = zq_act).
#include "zq_trt_kernels.h"

#include "zq/act_quant.h"
#include "zq/gemm.h"
#include "zq/norm_quant.h"
#include "zq/quantize.h"

namespace zq::kernels
{
namespace
{
zq_dtype dtype(FloatType t)
{
    return t == FloatType::kF16 ? ZQ_F16 : ZQ_F32;
}

int64_t groups(int64_t k, int64_t groupK)
{
    return groupK > 0 && groupK < k ? k / groupK : 1;
}

// The engine's choice (zqcompile/plugins/cuda.py int8_gemm_dequant; limits measured on an H200): the sm80+ mma
// kernel for K-group scales above M = 16 (no per-call fp16 dequant path here, so at every larger M) and for INT4
// or short-K INT8 row scales at 4 < M <= 64; else the Hopper INT8 GEMM (INT4 unpacked into the workspace); else
// the mma kernel again (A100: no Hopper kernel); the CUDA-core kernel, which takes any shape, last.
bool tryMma(zq_gemm_args const& a, cudaStream_t stream, cudaError_t* rc)
{
    *rc = zq_gemm_mma(&a, stream);
    return *rc != cudaErrorNotSupported;
}

cudaError_t runGemm(zq_gemm_args& a, void* workspace, size_t workspaceBytes, cudaStream_t stream)
{
    cudaError_t rc = cudaSuccess;
    if (a.x_is_int8)
    {
        bool const rowScales = a.groups == 1;
        bool const mmaFirst = rowScales ? (a.m > 4 && a.m <= 64 && (a.w_bits == 4 || a.k <= 1024)) : a.m > 16;
        if (mmaFirst && tryMma(a, stream, &rc))
            return rc;
    }
    if (a.x_is_int8 && a.groups == 1 && a.m > 4)
    {
        zq_gemm_args t = a;
        bool ready = true;
        if (a.w_bits == 4)
        {
            ready = workspace != nullptr && workspaceBytes >= static_cast<size_t>(a.n * a.k);
            if (ready)
            {
                cudaError_t e = zq_unpack_int4(static_cast<uint8_t const*>(a.wq), a.n, a.k,
                    static_cast<int8_t*>(workspace), stream);
                if (e != cudaSuccess)
                    return e;
                t.wq = workspace;
                t.w_bits = 8;
            }
        }
        if (ready)
        {
            cudaError_t e = zq_gemm_sm90(&t, stream);
            if (e != cudaErrorNotSupported)
                return e;
        }
        if (tryMma(a, stream, &rc))
            return rc;
    }
    return zq_gemm_simt(&a, stream);
}
} // namespace

cudaError_t launchQuantizePerToken(void const* x, FloatType xType, int64_t rows, int64_t cols, int8_t* q,
    float* scale, cudaStream_t stream)
{
    return zq_quantize_per_token(x, dtype(xType), rows, cols, q, scale, stream);
}

cudaError_t launchNormQuant(void const* x, void const* residual, void const* weight, void const* bias,
    FloatType xType, int64_t rows, int64_t cols, float eps, NormKind kind, int8_t* q, float* scale, void* out,
    void* hsum, cudaStream_t stream)
{
    return zq_norm_quant(x, residual, weight, bias, dtype(xType), rows, cols, eps, kind == NormKind::kRms ? 1 : 0, q,
        scale, out, hsum, stream);
}

cudaError_t launchActQuant(void const* x, void const* bias, void const* gate, FloatType xType, int64_t rows,
    int64_t cols, Act act, int8_t* q, float* scale, void* out, cudaStream_t stream)
{
    return zq_act_quant(x, bias, gate, dtype(xType), rows, cols, static_cast<int>(act), q, scale, out, stream);
}

cudaError_t launchInt8GemmDequant(int8_t const* xq, float const* xScale, int8_t const* wq, float const* wScale,
    void const* bias, void const* residual, FloatType epilogueType, int64_t m, int64_t n, int64_t k,
    int64_t groupK, int32_t wBits, Act act, void* y, FloatType yType, void* workspace, size_t workspaceBytes,
    cudaStream_t stream)
{
    (void) epilogueType; // bias and residual are in the output type, as in the library's epilogue
    zq_gemm_args a{xq, ZQ_F32, 1, xScale, wq, wBits, wScale, groups(k, groupK), bias, residual, static_cast<int>(act),
        y, dtype(yType), m, n, k};
    return runGemm(a, workspace, workspaceBytes, stream);
}

cudaError_t launchWeightOnlyGemm(void const* x, FloatType xType, int8_t const* wq, float const* wScale,
    void const* bias, void const* residual, int64_t m, int64_t n, int64_t k, int64_t groupK, int32_t wBits,
    Act act, void* y, void* workspace, size_t workspaceBytes, cudaStream_t stream)
{
    zq_gemm_args a{x, dtype(xType), 0, nullptr, wq, wBits, wScale, groups(k, groupK), bias, residual,
        static_cast<int>(act), y, dtype(xType), m, n, k};
    return runGemm(a, workspace, workspaceBytes, stream);
}

size_t gemmWorkspaceBytes(int64_t m, int64_t n, int64_t k, int32_t wBits)
{
    (void) m;
    return wBits == 4 ? static_cast<size_t>(n * k) : 0; // INT4 weights unpacked to INT8 for the Hopper GEMM
}
} // namespace zq::kernels
