// IPluginV3 plugins wrapping zqcompile's fused per-token INT8 kernels; see zq_trt_plugin.h.
#include "zq_trt_plugin.h"

#include <cstdio>
#include <cstring>
#include <new>
#include <utility>

using namespace nvinfer1;

namespace zq::trt
{
namespace
{
// The generated spec namespace of each op, as a type so one template reads them all.
template <Op kOp> struct Spec;
#define ZQ_SPEC(OP, NS)                                                                                           \
    template <> struct Spec<OP>                                                                                   \
    {                                                                                                             \
        static constexpr char const* kName = NS::kName;                                                           \
        static constexpr char const* kVersion = NS::kVersion;                                                     \
        static FieldSpec const* fields() { return NS::kFields; }                                                  \
        static constexpr int32_t kNbFields = NS::kNbFields;                                                       \
        static constexpr PortSpec const* kInputs = NS::kInputs;                                                   \
        static constexpr int32_t kNbInputs = NS::kNbInputsMax;                                                    \
        static constexpr PortSpec const* kOutputs = NS::kOutputs;                                                 \
        static constexpr int32_t kNbOutputs = NS::kNbOutputsMax;                                                  \
    }
ZQ_SPEC(Op::kQuantizePerToken, ZqQuantizePerToken);
ZQ_SPEC(Op::kNormQuant, ZqNormQuant);
ZQ_SPEC(Op::kActQuant, ZqActQuant);
ZQ_SPEC(Op::kInt8GemmDequant, ZqInt8GemmDequant);
ZQ_SPEC(Op::kWeightOnlyGemm, ZqWeightOnlyGemm);
#undef ZQ_SPEC

template <typename S>
OpInfo infoOf()
{
    return OpInfo{S::kName, S::kVersion, S::fields(), S::kNbFields};
}

struct Ports
{
    PortSpec const* inputs;
    int32_t nbInputs;
    PortSpec const* outputs;
    int32_t nbOutputs;
};

template <typename S>
Ports portsFrom()
{
    return Ports{S::kInputs, S::kNbInputs, S::kOutputs, S::kNbOutputs};
}

Ports portsOf(Op op) noexcept
{
    switch (op)
    {
    case Op::kQuantizePerToken: return portsFrom<Spec<Op::kQuantizePerToken>>();
    case Op::kNormQuant: return portsFrom<Spec<Op::kNormQuant>>();
    case Op::kActQuant: return portsFrom<Spec<Op::kActQuant>>();
    case Op::kInt8GemmDequant: return portsFrom<Spec<Op::kInt8GemmDequant>>();
    case Op::kWeightOnlyGemm: return portsFrom<Spec<Op::kWeightOnlyGemm>>();
    }
    return Ports{nullptr, 0, nullptr, 0};
}

PluginFieldType trtType(FieldType t) noexcept
{
    switch (t)
    {
    case FieldType::kInt32: return PluginFieldType::kINT32;
    case FieldType::kFloat32: return PluginFieldType::kFLOAT32;
    case FieldType::kChar: return PluginFieldType::kCHAR;
    }
    return PluginFieldType::kUNKNOWN;
}

int32_t fieldSlot(OpInfo const& info, char const* name, FieldType type) noexcept
{
    int32_t slot = 0;
    for (int32_t i = 0; i < info.nbFields; ++i)
    {
        if (info.fields[i].type != type)
            continue;
        if (std::strcmp(info.fields[i].name, name) == 0)
            return slot;
        ++slot;
    }
    return -1;
}

kernels::Act parseAct(std::string const& s) noexcept
{
    if (s == "gelu") return kernels::Act::kGelu;
    if (s == "gelu_tanh") return kernels::Act::kGeluTanh;
    if (s == "relu") return kernels::Act::kRelu;
    if (s == "silu") return kernels::Act::kSilu;
    return kernels::Act::kNone;
}

kernels::FloatType floatType(DataType t) noexcept
{
    return t == DataType::kHALF ? kernels::FloatType::kF16 : kernels::FloatType::kF32;
}

int64_t rowsOf(Dims const& d) noexcept
{
    int64_t rows = 1;
    for (int32_t i = 0; i + 1 < d.nbDims; ++i)
        rows *= d.d[i];
    return rows;
}

constexpr int32_t kOnnxFloat16 = 10;

bool isGemm(Op op) noexcept
{
    return op == Op::kInt8GemmDequant || op == Op::kWeightOnlyGemm;
}

int32_t check(cudaError_t e, char const* what) noexcept
{
    if (e == cudaSuccess)
        return 0;
    std::fprintf(stderr, "zq TensorRT plugin %s: %s\n", what, cudaGetErrorString(e));
    return -1;
}
} // namespace

OpInfo opInfo(Op op) noexcept
{
    switch (op)
    {
    case Op::kQuantizePerToken: return infoOf<Spec<Op::kQuantizePerToken>>();
    case Op::kNormQuant: return infoOf<Spec<Op::kNormQuant>>();
    case Op::kActQuant: return infoOf<Spec<Op::kActQuant>>();
    case Op::kInt8GemmDequant: return infoOf<Spec<Op::kInt8GemmDequant>>();
    case Op::kWeightOnlyGemm: return infoOf<Spec<Op::kWeightOnlyGemm>>();
    }
    return OpInfo{"", "", nullptr, 0};
}

int32_t FieldValues::getInt(OpInfo const& info, char const* name) const noexcept
{
    int32_t s = fieldSlot(info, name, FieldType::kInt32);
    return s < 0 ? 0 : ints[s];
}

float FieldValues::getFloat(OpInfo const& info, char const* name) const noexcept
{
    int32_t s = fieldSlot(info, name, FieldType::kFloat32);
    return s < 0 ? 0.F : floats[s];
}

std::string const& FieldValues::getStr(OpInfo const& info, char const* name) const noexcept
{
    static std::string const kEmpty;
    int32_t s = fieldSlot(info, name, FieldType::kChar);
    return s < 0 ? kEmpty : strs[s];
}

bool parseFields(OpInfo const& info, PluginFieldCollection const* fc, FieldValues& out, std::string& error) noexcept
{
    out = FieldValues{};
    for (int32_t i = 0; i < info.nbFields; ++i)
    {
        FieldSpec const& spec = info.fields[i];
        PluginField const* found = nullptr;
        for (int32_t j = 0; fc != nullptr && j < fc->nbFields; ++j)
            if (fc->fields[j].name != nullptr && std::strcmp(fc->fields[j].name, spec.name) == 0)
                found = &fc->fields[j];
        if (found == nullptr || found->data == nullptr || found->type != trtType(spec.type))
        {
            error = std::string(info.name) + ": field '" + spec.name + "' is missing or has the wrong type";
            return false;
        }
        switch (spec.type)
        {
        case FieldType::kInt32: out.ints.push_back(*static_cast<int32_t const*>(found->data)); break;
        case FieldType::kFloat32: out.floats.push_back(*static_cast<float const*>(found->data)); break;
        case FieldType::kChar:
        {
            std::string s(static_cast<char const*>(found->data), static_cast<size_t>(found->length));
            out.strs.push_back(s.substr(0, s.find('\0')));
            break;
        }
        }
    }
    return true;
}

ZqPlugin::ZqPlugin(Op op, FieldValues values, kernels::GemmPlan gemmPlan)
    : mOp(op)
    , mInfo(opInfo(op))
    , mValues(std::move(values))
    , mGemmPlan(gemmPlan)
{
}

IPluginCapability* ZqPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* ZqPlugin::clone() noexcept
{
    return new (std::nothrow) ZqPlugin(mOp, mValues, mGemmPlan);
}

char const* ZqPlugin::getPluginName() const noexcept { return mInfo.name; }
char const* ZqPlugin::getPluginVersion() const noexcept { return mInfo.version; }
char const* ZqPlugin::getPluginNamespace() const noexcept { return kPluginNamespace; }

int32_t ZqPlugin::flag(char const* name) const noexcept
{
    return name == nullptr ? 1 : mValues.getInt(mInfo, name);
}

int32_t ZqPlugin::inputIndex(char const* port) const noexcept
{
    Ports p = portsOf(mOp);
    int32_t idx = 0;
    for (int32_t i = 0; i < p.nbInputs; ++i)
    {
        bool present = flag(p.inputs[i].flag) != 0;
        if (std::strcmp(p.inputs[i].name, port) == 0)
            return present ? idx : -1;
        idx += present ? 1 : 0;
    }
    return -1;
}

int32_t ZqPlugin::nbInputs() const noexcept
{
    Ports p = portsOf(mOp);
    int32_t n = 0;
    for (int32_t i = 0; i < p.nbInputs; ++i)
        n += flag(p.inputs[i].flag) != 0 ? 1 : 0;
    return n;
}

int32_t ZqPlugin::getNbOutputs() const noexcept
{
    Ports p = portsOf(mOp);
    int32_t n = 0;
    for (int32_t i = 0; i < p.nbOutputs; ++i)
        n += flag(p.outputs[i].flag) != 0 ? 1 : 0;
    return n;
}

int32_t ZqPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbOutputs != getNbOutputs() || nbInputs != this->nbInputs())
        return -1;
    DataType const floatIn = inputTypes[0];
    switch (mOp)
    {
    case Op::kQuantizePerToken:
    case Op::kNormQuant:
    case Op::kActQuant:
        outputTypes[0] = DataType::kINT8;
        outputTypes[1] = DataType::kFLOAT;
        for (int32_t i = 2; i < nbOutputs; ++i)
            outputTypes[i] = floatIn;
        return 0;
    case Op::kInt8GemmDequant:
        outputTypes[0] = mValues.getInt(mInfo, "out_dtype") == kOnnxFloat16 ? DataType::kHALF : DataType::kFLOAT;
        return 0;
    case Op::kWeightOnlyGemm: outputTypes[0] = floatIn; return 0;
    }
    return -1;
}

int32_t ZqPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept
{
    if (nbInputs != this->nbInputs() || nbOutputs != getNbOutputs())
        return -1;
    DimsExprs const& x = inputs[0];
    int32_t const last = x.nbDims - 1;
    if (mOp == Op::kInt8GemmDequant || mOp == Op::kWeightOnlyGemm)
    {
        DimsExprs const& w = inputs[inputIndex("wq")];
        outputs[0] = x;
        outputs[0].d[last] = w.d[0]; // [..., N]
        return 0;
    }
    outputs[0] = x;                              // q
    outputs[1] = x;                              // per-token scale [..., 1]
    outputs[1].d[last] = exprBuilder.constant(1);
    for (int32_t i = 2; i < nbOutputs; ++i)      // out / sum
        outputs[i] = x;
    return 0;
}

bool ZqPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t /*nbOutputs*/) noexcept
{
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR)
        return false;
    auto isFloat = [](DataType t) { return t == DataType::kFLOAT || t == DataType::kHALF; };
    bool const gemm = mOp == Op::kInt8GemmDequant;
    DataType const gemmOut = mValues.getInt(mInfo, "out_dtype") == kOnnxFloat16 ? DataType::kHALF : DataType::kFLOAT;
    if (pos < nbInputs)
    {
        Ports p = portsOf(mOp);
        for (int32_t i = 0, idx = 0; i < p.nbInputs; ++i)
        {
            if (flag(p.inputs[i].flag) == 0)
                continue;
            if (idx++ != pos)
                continue;
            char const* name = p.inputs[i].name;
            if (!std::strcmp(name, "xq") || !std::strcmp(name, "wq"))
                return d.type == DataType::kINT8;
            if (!std::strcmp(name, "x_scale") || !std::strcmp(name, "w_scale"))
                return d.type == DataType::kFLOAT;
            // float activations, bias, residual, norm weight: one float type per node (that of port 0, or
            // for the GEMM, of its output: the kernels read bias and residual in the output type). Weight-only
            // GEMMs take fp16 x: their kernel (simt, the only one in the kernel library) reads 16-bit floats, so
            // TensorRT converts an fp32 x (zqcompile plans the kernel for fp16).
            if (gemm)
                return d.type == gemmOut;
            if (mOp == Op::kWeightOnlyGemm && pos == 0)
                return d.type == DataType::kHALF;
            return pos == 0 ? isFloat(d.type) : d.type == inOut[0].desc.type;
        }
        return false;
    }
    int32_t const out = pos - nbInputs;
    if (gemm)
        return d.type == gemmOut;
    if (mOp == Op::kWeightOnlyGemm)
        return d.type == inOut[0].desc.type;
    if (out == 0)
        return d.type == DataType::kINT8;
    if (out == 1)
        return d.type == DataType::kFLOAT;
    return d.type == inOut[0].desc.type;
}

int32_t ZqPlugin::configurePlugin(
    DynamicPluginTensorDesc const* /*in*/, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != this->nbInputs() || nbOutputs != getNbOutputs())
        return -1;
    std::string error;
    if (isGemm(mOp) && kernels::checkGemmPlan(mGemmPlan, error) != cudaSuccess)
    {
        std::fprintf(stderr, "zq TensorRT plugin %s: %s\n", mInfo.name, error.c_str());
        return -1;
    }
    return 0;
}

size_t ZqPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t /*nbInputs*/,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    if (!isGemm(mOp))
        return 0;
    Dims const& x = inputs[0].max;
    Dims const& w = inputs[inputIndex("wq")].max;
    int32_t const bits = mValues.getInt(mInfo, "w_bits");
    int64_t const k = w.d[1] * (bits == 4 ? 2 : 1);
    return kernels::gemmWorkspaceBytes(mGemmPlan, rowsOf(x), w.d[0], k, bits);
}

int32_t ZqPlugin::onShapeChange(
    PluginTensorDesc const* /*in*/, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    return nbInputs == this->nbInputs() && nbOutputs == getNbOutputs() ? 0 : -1;
}

int32_t ZqPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    auto in = [&](char const* port) -> void const* {
        int32_t i = inputIndex(port);
        return i < 0 ? nullptr : inputs[i];
    };
    Dims const& xd = inputDesc[0].dims;
    int64_t const rows = rowsOf(xd);
    int64_t const cols = xd.d[xd.nbDims - 1];
    kernels::FloatType const xType = floatType(inputDesc[0].type);
    auto q = static_cast<int8_t*>(outputs[0]);
    switch (mOp)
    {
    case Op::kQuantizePerToken:
        return check(kernels::launchQuantizePerToken(inputs[0], xType, rows, cols, q,
                         static_cast<float*>(outputs[1]), stream), mInfo.name);
    case Op::kNormQuant:
    {
        bool const emitOut = flag("emit_out") != 0;
        void* out = emitOut ? outputs[2] : nullptr;
        void* hsum = flag("emit_sum") != 0 ? outputs[emitOut ? 3 : 2] : nullptr;
        auto kind = mValues.getStr(mInfo, "kind") == "rms" ? kernels::NormKind::kRms : kernels::NormKind::kLayer;
        return check(kernels::launchNormQuant(inputs[0], in("residual"), in("weight"), in("bias"), xType, rows, cols,
                         mValues.getFloat(mInfo, "eps"), kind, q, static_cast<float*>(outputs[1]), out, hsum, stream),
            mInfo.name);
    }
    case Op::kActQuant:
        return check(kernels::launchActQuant(inputs[0], in("bias"), in("gate"), xType, rows, cols,
                         parseAct(mValues.getStr(mInfo, "act")), q, static_cast<float*>(outputs[1]),
                         flag("emit_out") != 0 ? outputs[2] : nullptr, stream), mInfo.name);
    case Op::kInt8GemmDequant:
    case Op::kWeightOnlyGemm:
    {
        int32_t const wi = inputIndex("wq");
        Dims const& wd = inputDesc[wi].dims;
        Dims const& sd = inputDesc[inputIndex("w_scale")].dims;
        int32_t const bits = mValues.getInt(mInfo, "w_bits");
        int64_t const n = wd.d[0];
        int64_t const k = wd.d[1] * (bits == 4 ? 2 : 1);
        int64_t const groupK = k / sd.d[1];
        auto act = parseAct(mValues.getStr(mInfo, "act"));
        size_t const ws = kernels::gemmWorkspaceBytes(mGemmPlan, rows, n, k, bits);
        if (mOp == Op::kWeightOnlyGemm)
            return check(kernels::launchWeightOnlyGemm(mGemmPlan, inputs[0], xType,
                             static_cast<int8_t const*>(inputs[wi]), static_cast<float const*>(in("w_scale")),
                             in("bias"), in("residual"), rows, n, k, groupK, bits, act, outputs[0], workspace, ws,
                             stream), mInfo.name);
        return check(kernels::launchInt8GemmDequant(mGemmPlan, static_cast<int8_t const*>(inputs[0]),
                         static_cast<float const*>(in("x_scale")), static_cast<int8_t const*>(inputs[wi]),
                         static_cast<float const*>(in("w_scale")), in("bias"), in("residual"), rows, n, k, groupK,
                         bits, act, outputs[0], floatType(outputDesc[0].type), workspace, ws, stream), mInfo.name);
    }
    }
    return -1;
}

IPluginV3* ZqPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* ZqPlugin::getFieldsToSerialize() noexcept
{
    // the same fields the creator parses, so deserialization goes through createPlugin(kRUNTIME)
    mSerialized.clear();
    int32_t ni = 0, nf = 0, ns = 0;
    for (int32_t i = 0; i < mInfo.nbFields; ++i)
    {
        FieldSpec const& f = mInfo.fields[i];
        switch (f.type)
        {
        case FieldType::kInt32: mSerialized.emplace_back(f.name, &mValues.ints[ni++], PluginFieldType::kINT32, 1); break;
        case FieldType::kFloat32:
            mSerialized.emplace_back(f.name, &mValues.floats[nf++], PluginFieldType::kFLOAT32, 1);
            break;
        case FieldType::kChar:
        {
            std::string const& s = mValues.strs[ns++];
            mSerialized.emplace_back(f.name, s.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(s.size() + 1));
            break;
        }
        }
    }
    mSerializedFc.nbFields = static_cast<int32_t>(mSerialized.size());
    mSerializedFc.fields = mSerialized.data();
    return &mSerializedFc;
}

template <Op kOp>
ZqCreator<kOp>::ZqCreator()
{
    OpInfo const info = opInfo(kOp);
    for (int32_t i = 0; i < info.nbFields; ++i)
        mFields.emplace_back(info.fields[i].name, nullptr, trtType(info.fields[i].type), 1);
    mFc.nbFields = static_cast<int32_t>(mFields.size());
    mFc.fields = mFields.data();
}

template <Op kOp>
IPluginV3* ZqCreator<kOp>::createPlugin(char const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    FieldValues values;
    kernels::GemmPlan plan;
    std::string error;
    OpInfo const info = opInfo(kOp);
    // the GEMMs' kernel_plan is parsed here, once: enqueue only looks its M up
    if (!parseFields(info, fc, values, error)
        || (isGemm(kOp) && !kernels::parseGemmPlan(values.getStr(info, "kernel_plan"), plan, error)))
    {
        std::fprintf(stderr, "zq TensorRT plugin %s (%s): %s\n", info.name, name ? name : "", error.c_str());
        return nullptr;
    }
    return new (std::nothrow) ZqPlugin(kOp, std::move(values), plan);
}

using QuantizePerTokenCreator = ZqCreator<Op::kQuantizePerToken>;
using NormQuantCreator = ZqCreator<Op::kNormQuant>;
using ActQuantCreator = ZqCreator<Op::kActQuant>;
using Int8GemmDequantCreator = ZqCreator<Op::kInt8GemmDequant>;
using WeightOnlyGemmCreator = ZqCreator<Op::kWeightOnlyGemm>;

REGISTER_TENSORRT_PLUGIN(QuantizePerTokenCreator);
REGISTER_TENSORRT_PLUGIN(NormQuantCreator);
REGISTER_TENSORRT_PLUGIN(ActQuantCreator);
REGISTER_TENSORRT_PLUGIN(Int8GemmDequantCreator);
REGISTER_TENSORRT_PLUGIN(WeightOnlyGemmCreator);
} // namespace zq::trt
