// The TensorRT plugins' kernel launches (zq_trt_kernels.h) implemented on the zq kernel library's C launch API
// (plugins_cuda/include/zq/*.h): the plugins run exactly the kernels the PyTorch engine runs. The enum values
// of zq_trt_kernels.h are the library's (FloatType = zq_dtype for fp32/fp16, Act = zq_act).
#include "zq_trt_kernels.h"

#include "zq/act_quant.h"
#include "zq/gemm.h"
#include "zq/norm_quant.h"
#include "zq/quantize.h"

#include <cstdio>

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

static_assert(GemmPlan::kMaxEntries == ZQ_GEMM_PLAN_MAX, "GemmPlan mirrors zq_gemm_plan");

// The plan's kernel for a.m; its fallback when that kernel declines at run time (cudaErrorNotSupported: pointer
// alignment, grid limits), said once per process on stderr so a slower path is never silent.
cudaError_t runGemm(GemmPlan const& plan, zq_gemm_args const& a, void* workspace, size_t workspaceBytes,
    cudaStream_t stream)
{
    int32_t i = 0;
    while (i + 1 < plan.count && a.m > plan.maxM[i])
        ++i;
    if (plan.count == 0)
        return cudaErrorInvalidValue;
    cudaError_t rc = zq_gemm_run(plan.kernel[i], &a, workspace, workspaceBytes, stream);
    if (rc != cudaErrorNotSupported || plan.fallback[i] < 0)
        return rc;
    static bool warned = false;
    if (!warned)
    {
        warned = true;
        std::fprintf(stderr, "zq TensorRT plugin: GEMM kernel %s declined M=%lld N=%lld K=%lld at run time; ran %s "
                     "(the plan's fallback)\n", zq_gemm_kernel_name(plan.kernel[i]), static_cast<long long>(a.m),
            static_cast<long long>(a.n), static_cast<long long>(a.k), zq_gemm_kernel_name(plan.fallback[i]));
    }
    return zq_gemm_run(plan.fallback[i], &a, workspace, workspaceBytes, stream);
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
    return zq_act_quant(x, bias, gate, dtype(xType), rows, cols, cols, static_cast<int>(act), q, scale, out, stream);
}

bool parseGemmPlan(std::string const& text, GemmPlan& plan, std::string& error)
{
    zq_gemm_plan p;
    if (zq_gemm_plan_parse(text.c_str(), &p) != 0)
    {
        error = "kernel_plan '" + text + "' is not a plan (<max M>:<kernel>[/<fallback>],...,inf:<kernel>)";
        return false;
    }
    plan = GemmPlan{};
    plan.count = p.count;
    for (int32_t i = 0; i < p.count; ++i)
    {
        plan.maxM[i] = p.max_m[i];
        plan.kernel[i] = p.kernel[i];
        plan.fallback[i] = p.fallback[i];
    }
    return true;
}

cudaError_t checkGemmPlan(GemmPlan const& plan, std::string& error)
{
    for (int32_t i = 0; i < plan.count; ++i)
        for (int32_t id : {plan.kernel[i], plan.fallback[i]})
            if (id >= 0 && !zq_gemm_kernel_available(id))
            {
                error = std::string("kernel_plan names GEMM kernel ") + zq_gemm_kernel_name(id) +
                    ", which cannot run on this device with this kernel library: export the ONNX model again "
                    "for this device (zq.export_onnx(..., dialect='tensorrt', gemm_device=...))";
                return cudaErrorNotSupported;
            }
    return cudaSuccess;
}

cudaError_t launchInt8GemmDequant(GemmPlan const& plan, int8_t const* xq, float const* xScale, int8_t const* wq,
    float const* wScale, void const* bias, void const* residual, int64_t m, int64_t n, int64_t k, int64_t groupK,
    int32_t wBits, Act act, void* y, FloatType yType, void* workspace, size_t workspaceBytes, cudaStream_t stream)
{
    zq_gemm_args a{xq, ZQ_F32, 1, xScale, wq, wBits, 0, wScale, groups(k, groupK), bias, residual,
        static_cast<int>(act), y, dtype(yType), m, n, k};
    return runGemm(plan, a, workspace, workspaceBytes, stream);
}

cudaError_t launchWeightOnlyGemm(GemmPlan const& plan, void const* x, FloatType xType, int8_t const* wq,
    float const* wScale, void const* bias, void const* residual, int64_t m, int64_t n, int64_t k, int64_t groupK,
    int32_t wBits, Act act, void* y, void* workspace, size_t workspaceBytes, cudaStream_t stream)
{
    zq_gemm_args a{x, dtype(xType), 0, nullptr, wq, wBits, 0, wScale, groups(k, groupK), bias, residual,
        static_cast<int>(act), y, dtype(xType), m, n, k};
    return runGemm(plan, a, workspace, workspaceBytes, stream);
}

size_t gemmWorkspaceBytes(GemmPlan const& plan, int64_t maxM, int64_t n, int64_t k, int32_t wBits)
{
    size_t bytes = 0;
    for (int32_t i = 0; i < plan.count; ++i)
    {
        for (int32_t id : {plan.kernel[i], plan.fallback[i]})
            if (id >= 0 && zq_gemm_workspace_bytes(id, n, k, wBits) > bytes)
                bytes = zq_gemm_workspace_bytes(id, n, k, wBits);
        if (maxM <= plan.maxM[i])
            break; // the buckets past maxM never run
    }
    return bytes;
}
} // namespace zq::kernels
