// TensorRT 10 IPluginV3 plugins for zqcompile's fused per-token INT8 ops. One plugin class serves all five
// ops (they differ only in ports, fields, output shapes and the kernel they launch); one creator class per
// op registers under the name/version/fields of zq_trt_fields.h, generated from zqcompile/plugins/trt_spec.py.
#pragma once

#include "zq_trt_fields.h"
#include "zq_trt_kernels.h"

#include <NvInferRuntime.h>

#include <string>
#include <vector>

namespace zq::trt
{
enum class Op : int32_t { kQuantizePerToken, kNormQuant, kActQuant, kInt8GemmDequant, kWeightOnlyGemm };

struct OpInfo
{
    char const* name;
    char const* version;
    FieldSpec const* fields;
    int32_t nbFields;
};

OpInfo opInfo(Op op) noexcept;

// Field values by spec order; strings kept as std::string, numbers as int32/float.
struct FieldValues
{
    std::vector<int32_t> ints;
    std::vector<float> floats;
    std::vector<std::string> strs;
    int32_t getInt(OpInfo const& info, char const* name) const noexcept;
    float getFloat(OpInfo const& info, char const* name) const noexcept;
    std::string const& getStr(OpInfo const& info, char const* name) const noexcept;
};

// Parses a PluginFieldCollection against the spec; false (and a message) on a missing or mistyped field.
bool parseFields(OpInfo const& info, nvinfer1::PluginFieldCollection const* fc, FieldValues& out,
    std::string& error) noexcept;

class ZqPlugin : public nvinfer1::IPluginV3,
                 public nvinfer1::IPluginV3OneCore,
                 public nvinfer1::IPluginV3OneBuild,
                 public nvinfer1::IPluginV3OneRuntime
{
public:
    // gemmPlan: the parsed kernel_plan field of the GEMM ops (parseGemmPlan), empty for the others.
    ZqPlugin(Op op, FieldValues values, kernels::GemmPlan gemmPlan = {});
    ~ZqPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
        nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs,
        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    int32_t flag(char const* name) const noexcept;
    // Input index of a port, or -1 when the optional port is absent (absent inputs are left out of the node).
    int32_t inputIndex(char const* port) const noexcept;
    int32_t nbInputs() const noexcept;

    Op mOp;
    OpInfo mInfo;
    FieldValues mValues;
    kernels::GemmPlan mGemmPlan;
    std::vector<nvinfer1::PluginField> mSerialized;
    nvinfer1::PluginFieldCollection mSerializedFc{};
};

template <Op kOp>
class ZqCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    ZqCreator();
    char const* getPluginName() const noexcept override { return opInfo(kOp).name; }
    char const* getPluginVersion() const noexcept override { return opInfo(kOp).version; }
    char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &mFc; }
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFc{};
};
} // namespace zq::trt
