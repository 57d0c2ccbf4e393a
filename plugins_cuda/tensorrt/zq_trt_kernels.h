// The launch functions the TensorRT plugins call. They are the same CUDA kernels as the GPU runtime
// (plugins_cuda/, branch `cuda`); this header fixes the signatures the plugins need so the plugin sources
// compile on their own. The kernel library provides the definitions (a thin adapter over its own launch
// headers), linked through the CMake target named by ZQ_TRT_KERNELS_TARGET.
//
// Conventions (zqcompile/ops/quant_math.py): rows = product of all dims but the last; per-token scales fp32
// [rows]; weights int8 [N, K] or INT4 packed two per byte along K as [N, K/2]; w_scale fp32 [N, K/group_k].
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>
#include <string>

namespace zq::kernels
{
enum class FloatType : int32_t { kF32 = 0, kF16 = 1 };
enum class Act : int32_t { kNone = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3, kSilu = 4 };
enum class NormKind : int32_t { kLayer = 0, kRms = 1 };

cudaError_t launchQuantizePerToken(void const* x, FloatType xType, int64_t rows, int64_t cols, int8_t* q,
    float* scale, cudaStream_t stream);

// h = x (+ residual); y = norm(h) -> q, scale; out = y and hsum = h when non-null.
cudaError_t launchNormQuant(void const* x, void const* residual, void const* weight, void const* bias,
    FloatType xType, int64_t rows, int64_t cols, float eps, NormKind kind, int8_t* q, float* scale, void* out,
    void* hsum, cudaStream_t stream);

// y = act(x + bias), or act(gate) * x when gate is non-null -> q, scale; out = y when non-null.
cudaError_t launchActQuant(void const* x, void const* bias, void const* gate, FloatType xType, int64_t rows,
    int64_t cols, Act act, int8_t* q, float* scale, void* out, cudaStream_t stream);

// The GEMM kernel per M bucket that zqcompile planned for this GEMM (the plugin's kernel_plan field, e.g.
// "4:simt,16:simt,64:mma/sm90,1024:sm90/simt,inf:sm90/simt"; zqcompile/plugins/gemm_kernels.py chose it), parsed
// once when the plugin is created: the plugins never choose a kernel themselves.
struct GemmPlan
{
    static constexpr int32_t kMaxEntries = 8;
    int32_t count = 0;
    int64_t maxM[kMaxEntries] = {};
    int32_t kernel[kMaxEntries] = {};   // kernel library ids (zq_gemm_kernel)
    int32_t fallback[kMaxEntries] = {}; // run when the kernel declines at run time; -1: none
};

// False (and a message) when the text is not a plan.
bool parseGemmPlan(std::string const& text, GemmPlan& plan, std::string& error);
// cudaErrorNotSupported (and a message) when a kernel of the plan cannot run on the current device, e.g. a plan
// made for an H200 (sm90) on an A100: re-export the ONNX model for this device.
cudaError_t checkGemmPlan(GemmPlan const& plan, std::string& error);

// y[m, n] = act(acc[m, n] * xScale[m] * wScale[n, g] (+ bias[n])) (+ residual[m, n]), int32 accumulation, with
// the plan's kernel for m (bias and residual in y's type).
cudaError_t launchInt8GemmDequant(GemmPlan const& plan, int8_t const* xq, float const* xScale, int8_t const* wq,
    float const* wScale, void const* bias, void const* residual, int64_t m, int64_t n, int64_t k, int64_t groupK,
    int32_t wBits, Act act, void* y, FloatType yType, void* workspace, size_t workspaceBytes, cudaStream_t stream);

// Float x times dequantized INT8/INT4 weights, same epilogue; y has x's type.
cudaError_t launchWeightOnlyGemm(GemmPlan const& plan, void const* x, FloatType xType, int8_t const* wq,
    float const* wScale, void const* bias, void const* residual, int64_t m, int64_t n, int64_t k, int64_t groupK,
    int32_t wBits, Act act, void* y, void* workspace, size_t workspaceBytes, cudaStream_t stream);

// Workspace the plan's kernels (fallbacks included) need for up to maxM rows of [n, k]; 0 when none.
size_t gemmWorkspaceBytes(GemmPlan const& plan, int64_t maxM, int64_t n, int64_t k, int32_t wBits);
} // namespace zq::kernels
