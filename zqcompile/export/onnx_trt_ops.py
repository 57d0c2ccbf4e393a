"""TensorRT-dialect ONNX translations: each op declared tensorrt="plugin" becomes ONE node in the `zq.trt` domain
whose op type and attributes are exactly its plugin's name and fields (zqcompile/plugins/trt_spec.py),
registered with `@onnx_translation(name, dialect="tensorrt")`. Absent optional inputs are left out and flagged by
`has_*` fields; outputs not emitted are not produced by the plugin and are replaced by empty constants. Ops
declared tensorrt="standard" (static quantization, the unfused QDQ forms) keep their standard translation:
TensorRT builds those elementwise ops natively.

The GEMM plugins get their kernel per M bucket as the `kernel_plan` field, chosen by the engine's chooser
(zqcompile/plugins/gemm_kernels.py) for the node's problem on the TensorRT target (`gemm_target`: the device the
export runs on, else an H200-class sm_90 with the Hopper GEMM, written in the model's metadata); the plugin parses
it once and never chooses.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import onnxscript

from zqcompile.errors import ExportError
from zqcompile.export.onnx_ops import empty_like
from zqcompile.ops.registry import onnx_translation
from zqcompile.plugins import trt_spec
from zqcompile.plugins.gemm_kernels import GemmDevice, GemmProblem, NoGemmKernel, plan_text

trt_spec.register_onnx_schemas()
_trt = onnxscript.values.Opset(trt_spec.DOMAIN, trt_spec.DOMAIN_VERSION)


# Without a CUDA device at export: the GPU zqcompile's kernels are tuned for (the plugin refuses a plan whose
# kernels its device cannot run, naming gemm_device=).
ASSUMED_TARGET = GemmDevice("sm_90 (assumed: no CUDA device at export)", (9, 0), library=True, sm90_library=True,
                            tensorrt=True)
_target: contextvars.ContextVar[GemmDevice] = contextvars.ContextVar("zq_trt_gemm_target", default=ASSUMED_TARGET)
_ONNX_DTYPES = {1: "float32", 3: "int8", 10: "float16", 16: "bfloat16"}


def default_gemm_target() -> GemmDevice:
    """The current CUDA device as the plugin will see it (the plugin links the kernel library), else ASSUMED_TARGET."""
    import torch
    if not torch.cuda.is_available():
        return ASSUMED_TARGET
    from dataclasses import replace

    from zqcompile.plugins.gemm_plan import gemm_device
    d = gemm_device(torch.device("cuda"))
    return replace(d, library=True, sm90_library=d.sm90_library or not d.library, tensorrt=True)


@contextlib.contextmanager
def gemm_target(device: GemmDevice) -> Iterator[GemmDevice]:
    """The device the GEMM plugins' kernel plans are made for, while a TensorRT-dialect export runs."""
    from dataclasses import replace
    token = _target.set(replace(device, tensorrt=True))
    try:
        yield _target.get()
    finally:
        _target.reset(token)


def kernel_plan(zq_op: str, x, wq, w_scale, w_bits: int, out_dtype: str) -> str:
    """The kernel_plan field of a GEMM plugin node. The plugins take bias and residual in the output type and the
    weight-only plugin fp16 x (supportsFormatCombination), so the problem is planned with those."""
    k, groups = int(x.shape[-1]), int(w_scale.shape[1])
    x_dtype = "int8" if zq_op == "int8_gemm_dequant" else "float16"
    problem = GemmProblem(zq_op, int(wq.shape[0]), k, int(w_bits), 0 if groups == 1 else k // groups, x_dtype,
                          out_dtype)
    try:
        return plan_text(problem, _target.get())
    except NoGemmKernel as e:
        raise ExportError(f"{zq_op} has no TensorRT kernel: {e}") from None


def plugin_node(zq_op: str, inputs: list, attrs: dict, num_outputs: int):
    spec = trt_spec.plugin_for(zq_op)
    trt_spec.check_attributes(spec, attrs)
    present = [x for x in inputs if x is not None]
    outs = getattr(_trt, spec.name)(*present, **attrs, _outputs=num_outputs)
    return outs if num_outputs > 1 else (outs,)


def _flag(v) -> int:
    return int(v is not None)


@onnx_translation("quantize_per_token", dialect="tensorrt")
def quantize_per_token(x):
    return plugin_node("quantize_per_token", [x], {}, 2)


@onnx_translation("norm_quant", dialect="tensorrt")
def norm_quant(x, residual, weight, bias, eps: float, kind: str, emit_out: bool, emit_sum: bool):
    emit_sum = bool(emit_sum and residual is not None)
    attrs = dict(eps=float(eps), kind=kind, emit_out=int(emit_out), emit_sum=int(emit_sum),
                 has_residual=_flag(residual), has_bias=_flag(bias))
    outs = list(plugin_node("norm_quant", [x, residual, weight, bias], attrs, 2 + emit_out + emit_sum))
    q, s = outs[:2]
    rest = outs[2:]
    out = rest.pop(0) if emit_out else empty_like(x)
    hsum = rest.pop(0) if emit_sum else empty_like(x)
    return q, s, out, hsum


@onnx_translation("act_quant", dialect="tensorrt")
def act_quant(x, bias, gate, act: str, emit_out: bool):
    attrs = dict(act=act, emit_out=int(emit_out), has_bias=_flag(bias), has_gate=_flag(gate))
    outs = plugin_node("act_quant", [x, bias, gate], attrs, 2 + int(emit_out))
    return outs[0], outs[1], (outs[2] if emit_out else empty_like(x))


@onnx_translation("int8_gemm_dequant", dialect="tensorrt")
def int8_gemm_dequant(xq, x_scale, wq, w_scale, bias, residual, act: str, w_bits: int, out_dtype: int,
                      two_level: bool = False):  # the same values either way (an fp32 K-group scale each)
    attrs = dict(act=act, w_bits=int(w_bits), out_dtype=int(out_dtype), has_bias=_flag(bias),
                 has_residual=_flag(residual),
                 kernel_plan=kernel_plan("int8_gemm_dequant", xq, wq, w_scale, w_bits, _ONNX_DTYPES[int(out_dtype)]))
    return plugin_node("int8_gemm_dequant", [xq, x_scale, wq, w_scale, bias, residual], attrs, 1)[0]


@onnx_translation("weight_only_gemm", dialect="tensorrt")
def weight_only_gemm(x, wq, w_scale, bias, residual, act: str, w_bits: int):
    attrs = dict(act=act, w_bits=int(w_bits), has_bias=_flag(bias), has_residual=_flag(residual),
                 kernel_plan=kernel_plan("weight_only_gemm", x, wq, w_scale, w_bits, "float16"))
    return plugin_node("weight_only_gemm", [x, wq, w_scale, bias, residual], attrs, 1)[0]


def present_outputs(spec: trt_spec.PluginSpec, attrs: dict) -> int:
    return sum(1 for p in spec.outputs if p.optional_flag is None or attrs.get(p.optional_flag) == 1)


def _trim_outputs(model) -> None:
    """The plugin produces only the outputs its flags ask for, in order; onnxscript gives a schema'd node all
    of its outputs, so the unused tail is cut (and checked to be unused)."""
    import onnx
    by_name = {s.name: s for s in trt_spec.PLUGINS.values()}
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.domain != trt_spec.DOMAIN:
            continue
        spec = by_name[node.op_type]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        n = present_outputs(spec, attrs)
        extra = list(node.output[n:])
        if any(e in used for e in extra):
            raise RuntimeError(f"{node.op_type} {node.name}: outputs {extra} beyond its {n} flagged outputs are used")
        del node.output[n:]


def finalize_trt_model(model) -> None:
    """Trim plugin outputs to the flagged ones; relabel INT4 weights. INT4 weights are packed uint8 in the graph;
    TensorRT plugins take the bytes as an int8 tensor (TensorRT has no uint8 constants), so the initializer is
    relabelled int8 with its bytes unchanged."""
    import onnx
    from onnx import numpy_helper
    _trim_outputs(model)
    inits = {t.name: t for t in model.graph.initializer}
    by_name = {s.name: s for s in trt_spec.PLUGINS.values()}
    for node in model.graph.node:
        spec = by_name.get(node.op_type) if node.domain == trt_spec.DOMAIN else None
        idx = spec.weight_input if spec is not None else None
        if idx is None or idx >= len(node.input) or node.input[idx] not in inits:
            continue
        t = inits[node.input[idx]]
        if t.data_type == onnx.TensorProto.UINT8:
            arr = numpy_helper.to_array(t).view("int8")
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
            for vi in list(model.graph.value_info) + list(model.graph.input):
                if vi.name == t.name:
                    vi.type.tensor_type.elem_type = onnx.TensorProto.INT8
