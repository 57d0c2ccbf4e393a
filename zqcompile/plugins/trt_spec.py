"""The one spec of zqcompile's TensorRT plugins: for each zq op declared tensorrt="plugin" (zqcompile/ops/library.py;
`check_declarations` holds the two together), the plugin's name, version, inputs, outputs and fields (name +
type). Three things are generated from it and must agree:
- the ONNX `zq.trt` domain schemas (so `onnx.checker` validates every plugin node's attributes),
- the attributes the TensorRT-dialect exporter writes on each node (zqcompile/export/onnx_trt_ops.py),
- the C++ header `plugins_cuda/tensorrt/zq_trt_fields.h` with the field names/types the IPluginV3 creators
  declare (`python -m zqcompile.plugins.trt_spec > plugins_cuda/tensorrt/zq_trt_fields.h`; a test diffs it).
TensorRT's ONNX parser turns an unknown node into a plugin whose creator has the node's op type as name and
version "1" (no `plugin_version` attribute needed), passing ONNX INT attributes as kINT32 fields, FLOAT as
kFLOAT32 and STRING as kCHAR. Optional inputs are left out of the node; `has_*` fields say which are there.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

DOMAIN = "zq.trt"
DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = ""  # the parser's default; REGISTER_TENSORRT_PLUGIN registers into it

FIELD_TYPES = {"int": "kINT32", "float": "kFLOAT32", "str": "kCHAR"}


@dataclass(frozen=True)
class Field:
    name: str
    type: str  # "int" | "float" | "str"
    doc: str


@dataclass(frozen=True)
class Port:
    name: str
    types: tuple[str, ...]  # ONNX tensor types
    optional_flag: str | None = None  # the `has_*` / `emit_*` field that says the port is present


@dataclass(frozen=True)
class PluginSpec:
    name: str
    version: str
    zq_op: str
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    fields: tuple[Field, ...]
    doc: str

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def weight_input(self) -> int | None:
        """Position on the node of the quantized-weight input `wq` (packed INT4 is relabelled int8 there), None
        when the plugin takes no weight. Ports before it are never optional, so the position is fixed."""
        names = [p.name for p in self.inputs]
        if "wq" not in names:
            return None
        i = names.index("wq")
        if any(p.optional_flag for p in self.inputs[:i]):
            raise ValueError(f"{self.name}: an optional input before wq would move it")
        return i


FLOATS = ("tensor(float)", "tensor(float16)")
F32, I8 = ("tensor(float)",), ("tensor(int8)",)
ACT = Field("act", "str", "none | gelu | gelu_tanh | relu | silu (zqcompile.ops.quant_math.ACTIVATIONS)")
W_BITS = Field("w_bits", "int", "8: int8 [N, K]; 4: two INT4 per byte along K, [N, K/2] (low nibble = even k)")
HAS_BIAS = Field("has_bias", "int", "1 when the bias input is present")
HAS_RESIDUAL = Field("has_residual", "int", "1 when the residual input is present")
KERNEL_PLAN = Field("kernel_plan", "str", "the GEMM kernel per M bucket that zqcompile chose "
                    "(zqcompile/plugins/gemm_kernels.py), '<max M>:<kernel>[/<fallback>],...,inf:<kernel>', "
                    "parsed once by the plugin (zq_gemm_plan_parse)")

PLUGINS: dict[str, PluginSpec] = {s.zq_op: s for s in (
    PluginSpec("ZqQuantizePerToken", "1", "quantize_per_token",
               inputs=(Port("x", FLOATS),), outputs=(Port("q", I8), Port("scale", F32)), fields=(),
               doc="dynamic token-wise INT8: scale = max(amax, EPS) / 127 per row"),
    PluginSpec("ZqNormQuant", "1", "norm_quant",
               inputs=(Port("x", FLOATS), Port("residual", FLOATS, "has_residual"), Port("weight", FLOATS),
                       Port("bias", FLOATS, "has_bias")),
               outputs=(Port("q", I8), Port("scale", F32), Port("out", FLOATS, "emit_out"),
                        Port("sum", FLOATS, "emit_sum")),
               fields=(Field("eps", "float", "normalisation epsilon"), Field("kind", "str", "layer | rms"),
                       Field("emit_out", "int", "1: also output the normalised float row"),
                       Field("emit_sum", "int", "1: also output x + residual"), HAS_RESIDUAL, HAS_BIAS),
               doc="(x + residual) -> LayerNorm/RMSNorm -> token-wise INT8, one pass over the row"),
    PluginSpec("ZqActQuant", "1", "act_quant",
               inputs=(Port("x", FLOATS), Port("bias", FLOATS, "has_bias"), Port("gate", FLOATS, "has_gate")),
               outputs=(Port("q", I8), Port("scale", F32), Port("out", FLOATS, "emit_out")),
               fields=(ACT, Field("emit_out", "int", "1: also output the float activation"), HAS_BIAS,
                       Field("has_gate", "int", "1: y = act(gate) * x (gated MLP)")),
               doc="act(x + bias) or act(gate) * x -> token-wise INT8"),
    PluginSpec("ZqInt8GemmDequant", "1", "int8_gemm_dequant",
               inputs=(Port("xq", I8), Port("x_scale", F32), Port("wq", I8), Port("w_scale", F32),
                       Port("bias", FLOATS, "has_bias"), Port("residual", FLOATS, "has_residual")),
               outputs=(Port("y", FLOATS),),
               fields=(ACT, W_BITS, Field("out_dtype", "int", "ONNX TensorProto dtype of y (1 fp32, 10 fp16)"),
                       HAS_BIAS, HAS_RESIDUAL, KERNEL_PLAN),
               doc="W8A8 / W4A8 GEMM, int32 accumulate, x_scale[m] * w_scale[n, g] (+bias) -> act (+residual)"),
    PluginSpec("ZqWeightOnlyGemm", "1", "weight_only_gemm",
               inputs=(Port("x", FLOATS), Port("wq", I8), Port("w_scale", F32), Port("bias", FLOATS, "has_bias"),
                       Port("residual", FLOATS, "has_residual")),
               outputs=(Port("y", FLOATS),),
               fields=(ACT, W_BITS, HAS_BIAS, HAS_RESIDUAL, KERNEL_PLAN),
               doc="W8A16 / W4A16: weights dequantized in the mainloop, same epilogue (fp16 x: the plugin's kernel "
                   "reads 16-bit floats)"),
)}


def plugin_for(zq_op: str) -> PluginSpec:
    try:
        return PLUGINS[zq_op]
    except KeyError:
        raise KeyError(f"zq op {zq_op!r} has no TensorRT plugin spec in zqcompile/plugins/trt_spec.py") from None


def check_declarations() -> None:
    """The link to the op declarations (zqcompile/ops/library.py): the ops declared tensorrt="plugin" are exactly
    the ops with a spec here, and each has its TensorRT-dialect translation registered."""
    from zqcompile.ops import registry
    declared = {d.name for d in registry.declared() if d.tensorrt == "plugin"}
    if declared != set(PLUGINS):
        raise ValueError(f"TensorRT plugins out of sync with the op declarations: declared tensorrt='plugin' "
                         f"without a spec: {sorted(declared - set(PLUGINS))}; a spec for an op not declared "
                         f"tensorrt='plugin': {sorted(set(PLUGINS) - declared)}")
    missing = sorted(n for n in declared if "tensorrt" not in registry.op(n).translations)
    if missing:
        raise ValueError(f"ops with a TensorRT plugin but no @onnx_translation(..., dialect='tensorrt'): {missing}")


def check_attributes(spec: PluginSpec, attrs: dict) -> None:
    """The exporter's attributes must be exactly the plugin's fields, with the declared Python types."""
    if tuple(attrs) != spec.field_names:
        raise ValueError(f"{spec.name}: attributes {tuple(attrs)} != plugin fields {spec.field_names}")
    py = {"int": int, "float": float, "str": str}
    for f in spec.fields:
        if not isinstance(attrs[f.name], py[f.type]) or isinstance(attrs[f.name], bool):
            raise TypeError(f"{spec.name}.{f.name}: expected {f.type}, got {attrs[f.name]!r}")


# ---- ONNX schemas ------------------------------------------------------------------------------------------
def onnx_schema(spec: PluginSpec):
    from onnx.defs import OpSchema
    attr_type = {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT, "str": OpSchema.AttrType.STRING}
    constraints: dict[tuple[str, ...], str] = {}
    for port in spec.inputs + spec.outputs:  # one type variable per distinct type list
        if port.types not in constraints:
            constraints[port.types] = f"T{len(constraints)}"
    option = OpSchema.FormalParameterOption

    def formal(port: Port):
        opt = option.Optional if port.optional_flag else option.Single
        return OpSchema.FormalParameter(port.name, constraints[port.types], "", param_option=opt)

    return OpSchema(spec.name, DOMAIN, DOMAIN_VERSION, doc=spec.doc,
                    inputs=[formal(p) for p in spec.inputs], outputs=[formal(p) for p in spec.outputs],
                    type_constraints=[(v, list(t), "") for t, v in constraints.items()],
                    attributes=[OpSchema.Attribute(f.name, attr_type[f.type], f.doc, required=True)
                                for f in spec.fields])


def register_onnx_schemas() -> None:
    """Make the `zq.trt` ops known to onnx (checker, shape inference, onnxscript); idempotent."""
    import onnx.defs
    for spec in PLUGINS.values():
        if not onnx.defs.has(spec.name, DOMAIN):
            onnx.defs.register_schema(onnx_schema(spec))


# ---- C++ header --------------------------------------------------------------------------------------------
def cpp_header() -> str:
    lines = ["// Generated by `python -m zqcompile.plugins.trt_spec` from zqcompile/plugins/trt_spec.py.",
             "// Do not edit: tests/plugins/test_trt_spec.py checks this file against the spec.",
             "#pragma once", "", "#include <cstdint>", "", "namespace zq::trt", "{",
             f'constexpr char const* kPluginNamespace = "{PLUGIN_NAMESPACE}";', "",
             "enum class FieldType : int32_t { kInt32, kFloat32, kChar };", "",
             "struct FieldSpec", "{", "    char const* name;", "    FieldType type;", "};", "",
             "// A tensor port; `flag` names the int field that says an optional port is present (nullptr: always).",
             "struct PortSpec", "{", "    char const* name;", "    char const* flag;", "};", ""]
    cpp_type = {"int": "FieldType::kInt32", "float": "FieldType::kFloat32", "str": "FieldType::kChar"}
    for spec in PLUGINS.values():
        ns = spec.name
        lines += [f"namespace {ns}", "{", f'constexpr char const* kName = "{spec.name}";',
                  f'constexpr char const* kVersion = "{spec.version}";',
                  f"constexpr int32_t kNbInputsMax = {len(spec.inputs)};",
                  f"constexpr int32_t kNbOutputsMax = {len(spec.outputs)};",
                  f"constexpr int32_t kNbFields = {len(spec.fields)};"]
        if spec.fields:
            entries = ", ".join(f'{{"{f.name}", {cpp_type[f.type]}}}' for f in spec.fields)
            lines.append(f"constexpr FieldSpec kFields[kNbFields] = {{{entries}}};")
        else:
            lines.append("constexpr FieldSpec const* kFields = nullptr;")
        for kind, ports in (("Inputs", spec.inputs), ("Outputs", spec.outputs)):
            entries = ", ".join(f'{{"{p.name}", ' + (f'"{p.optional_flag}"' if p.optional_flag else "nullptr") + "}"
                                for p in ports)
            lines.append(f"constexpr PortSpec k{kind}[k Nb{kind}Max] = {{{entries}}};".replace("k Nb", "kNb"))
        lines += [f"}} // namespace {ns}", ""]
    lines += ["} // namespace zq::trt", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(cpp_header())
