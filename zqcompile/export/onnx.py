"""ONNX export of a compiled engine: the graph (ATen ops + zq ops) goes through the torch.onnx exporter
(dynamo=True) with a translation table for the zq ops, is validated with the full ONNX checker, and is written
atomically. Two dialects: "standard" (every zq op as standard ONNX ops; runs in ONNX Runtime CPU) and
"tensorrt" (each fused zq op as one plugin node in the `zq.trt` domain, see zqcompile/plugins/trt_spec.py).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, Union

import torch

from zqcompile.errors import ExportError  # noqa: F401 - raised here, defined there
from zqcompile.ops import registry

OPSET = 18  # torchlib's native opset: LayerNormalization (17), ReduceMax with axes as an input (18)
DIALECTS = registry.ONNX_DIALECTS
_EXTERNAL_DATA_BYTES = 1 << 30  # protobuf caps a file at 2 GiB; above this the weights go to <name>.data


class Exportable(Protocol):
    """What export needs from an engine (zqcompile.runtime.engine.Engine satisfies it)."""
    gm: torch.fx.GraphModule
    example_inputs: tuple
    input_names: list[str]


@dataclass(frozen=True)
class ExportSource:
    gm: torch.nn.Module
    example_inputs: tuple
    input_names: list[str]


def resolve_source(engine_or_gm: Union[Exportable, torch.nn.Module], example_inputs: Sequence[Any] | None,
                   input_names: Sequence[str] | None) -> ExportSource:
    if isinstance(engine_or_gm, torch.nn.Module):
        if example_inputs is None:
            raise ExportError("export of a plain GraphModule needs example_inputs=(tensor, ...)")
        gm, inputs, names = engine_or_gm, tuple(example_inputs), input_names
    elif hasattr(engine_or_gm, "gm") and hasattr(engine_or_gm, "example_inputs"):
        gm = engine_or_gm.gm
        inputs = tuple(example_inputs if example_inputs is not None else engine_or_gm.example_inputs)
        names = input_names or getattr(engine_or_gm, "input_names", None)
    else:
        raise ExportError(f"cannot export a {type(engine_or_gm).__name__}: pass a zqcompile Engine "
                          "(zq.compile / zq.load) or a GraphModule with example_inputs")
    names = list(names) if names else [f"input_{i}" for i in range(len(inputs))]
    if len(names) != len(inputs):
        raise ExportError(f"{len(names)} input names {names} for {len(inputs)} example inputs")
    return ExportSource(gm, inputs, names)


# ---- translation tables ---------------------------------------------------------------------------------
def translation_table(dialect: str) -> dict[Any, Callable]:
    """{zq op overload: onnxscript translator} for `dialect`, read from the op registry once the translator
    modules have registered against it."""
    if dialect not in DIALECTS:
        raise ExportError(f"unknown ONNX dialect {dialect!r}; choose one of {DIALECTS}")
    from zqcompile.export import onnx_ops  # noqa: F401 - registers the standard translations
    if dialect == "tensorrt":
        from zqcompile.export import onnx_trt_ops  # noqa: F401 - registers the plugin-node translations
        from zqcompile.plugins import trt_spec
        trt_spec.check_declarations()
    return registry.translation_table(dialect)


_BUILTIN_NAMESPACES = {"aten", "prims", "_operator", "builtins", "math", "higher_order"}


def module_fqn(node: torch.fx.Node) -> str:
    """The user's module FQN of a node, as a per-module override names it (capture's wrapper prefix removed)."""
    from zqcompile.capture import fqn_of
    return fqn_of(node) or "<top level>"


def check_translatable(gm: torch.nn.Module, table: dict[Any, Callable], dialect: str = "standard") -> None:
    """Fail before the exporter does, naming the op and the module it came from."""
    graph = getattr(gm, "graph", None)
    if graph is None:
        return
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target.namespace in _BUILTIN_NAMESPACES or node.target in table:
            continue
        where = f"(node {node.name!r}) in module {module_fqn(node)!r}"
        keep_out = f"keep that module out of quantization (override={{{module_fqn(node)!r}: 'fp16'}})"
        decl = registry.lookup(node.target)
        if decl is not None and not decl.exported:
            raise ExportError(f"op {decl.qualname} {where} is runtime-only: {decl.not_exported}")
        if decl is not None:
            raise ExportError(f"no {dialect} ONNX translation for op {decl.qualname} {where}. Register one with "
                              f"@onnx_translation({decl.name!r}, dialect={dialect!r}) in zqcompile/export/, or "
                              f"{keep_out}.")
        raise ExportError(f"no ONNX translation for op {node.target.name()} {where}. Declare it in "
                          f"zqcompile/ops/library.py and register a translator with @onnx_translation, or "
                          f"{keep_out}.")


def dynamic_shapes_for(inputs: tuple, names: list[str]) -> tuple:
    """Batch (dim 0) and sequence (dim 1) stay symbolic, named so across inputs."""
    shapes = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            shapes.append({0: "batch", 1: "seq"})
        elif isinstance(x, torch.Tensor) and x.dim() == 1:
            shapes.append({0: "batch"})
        else:
            shapes.append(None)
    return tuple(shapes)


def opset_for(gm: torch.nn.Module) -> int:
    """OPSET, or FP8_OPSET when the graph holds FP8 E4M3 tensors (float8 Quantize/DequantizeLinear and Cast)."""
    from zqcompile.export.onnx_ops import FP8_OPSET
    graph = getattr(gm, "graph", None)
    for node in graph.nodes if graph is not None else ():
        val = node.meta.get("val")
        vals = val if isinstance(val, (tuple, list)) else (val,)
        if any(isinstance(v, torch.Tensor) and v.dtype == torch.float8_e4m3fn for v in vals):
            return FP8_OPSET
    return OPSET


def _run_exporter(src: ExportSource, table: dict, dynamic: bool):
    kwargs = dict(dynamo=True, custom_translation_table=table, input_names=src.input_names,
                  opset_version=opset_for(src.gm), optimize=True, verbose=False, external_data=False)
    if dynamic:
        kwargs["dynamic_shapes"] = dynamic_shapes_for(src.example_inputs, src.input_names)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
        warnings.filterwarnings("ignore", category=FutureWarning)
        return torch.onnx.export(src.gm, src.example_inputs, **kwargs)


def to_onnx_model(src: ExportSource, dialect: str, dynamic: bool = True, gemm_device=None):
    """Export to an in-memory onnx.ModelProto (not yet checked or written). gemm_device (TensorRT dialect): the
    zqcompile.plugins.gemm_kernels.GemmDevice the GEMM plugins' kernel plans are made for (default: this machine's
    CUDA device, else an sm_90 with the Hopper GEMM)."""
    import contextlib
    table = translation_table(dialect)
    check_translatable(src.gm, table, dialect)
    target = contextlib.nullcontext(None)
    if dialect == "tensorrt":
        from zqcompile.export.onnx_trt_ops import default_gemm_target, gemm_target
        from zqcompile.plugins import trt_spec
        trt_spec.register_onnx_schemas()
        target = gemm_target(gemm_device or default_gemm_target())
    with target as planned_for:
        program = _export(src, table, dynamic, dialect)
    model = program.model_proto
    if dialect == "tensorrt":
        from zqcompile.export.onnx_trt_ops import finalize_trt_model
        finalize_trt_model(model)
        entry = model.metadata_props.add()
        entry.key, entry.value = "zqcompile.gemm_kernels_planned_for", planned_for.describe()
    entry = model.metadata_props.add()
    entry.key, entry.value = "zqcompile.dialect", dialect
    return model


def _export(src: ExportSource, table: dict, dynamic: bool, dialect: str):
    try:
        return _run_exporter(src, table, dynamic)
    except Exception as e:  # the exporter raises its own classes; only this one retry is shape-related
        if not dynamic or "static shape" not in str(e):
            raise ExportError(f"torch.onnx could not export the graph ({dialect} dialect): "
                              f"{type(e).__name__}: {_summary(e)}") from e
        warnings.warn("the engine's graph was captured with static shapes; exporting ONNX with fixed "
                      f"input shapes {[tuple(x.shape) for x in src.example_inputs]} (capture with dynamic "
                      "batch/seq to keep them dynamic)", stacklevel=4)
        return _run_exporter(src, table, dynamic=False)


def _summary(e: Exception) -> str:
    text = str(e)
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    return text.strip()[:2000]


# ---- atomic write ---------------------------------------------------------------------------------------
def save_atomic(model, path: Union[str, os.PathLike]) -> Path:
    """Write model to path (+ path.data when > 1 GiB of weights) via a temp dir in the same folder and
    os.replace, checking the written file with the full checker first: on any failure nothing is left."""
    import onnx

    from zqcompile.files import OutputPathError, check_output_file, looks_like_onnx
    try:
        check_output_file(path, "ONNX model", replaceable=looks_like_onnx, kind="an ONNX model")
    except OutputPathError as e:
        raise ExportError(str(e)) from None
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror} (folder {parent})") from e
    try:
        tmp = tmpdir / path.name
        data_name = f"{path.name}.data"
        big = model.ByteSize() > _EXTERNAL_DATA_BYTES
        onnx.save_model(model, str(tmp), save_as_external_data=big, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        onnx.checker.check_model(str(tmp), full_check=True)
        if big:
            os.replace(tmpdir / data_name, parent / data_name)
        os.replace(tmp, path)
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror}") from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def export_onnx(engine: Union[Exportable, torch.nn.Module], path: Union[str, os.PathLike],
                dialect: str = "standard", example_inputs: Sequence[Any] | None = None,
                input_names: Sequence[str] | None = None, dynamic: bool = True, gemm_device=None) -> Path:
    """Export a compiled engine (or a GraphModule + example_inputs) to ONNX at `path`.

    dialect="standard": standard ONNX (opset 18; 19 with FP8 E4M3 tensors), runs in ONNX Runtime on CPU.
    dialect="tensorrt": fused zq ops as `zq.trt` plugin nodes for TensorRT with libzq_trt_plugins.
    Batch and sequence axes stay dynamic when the captured graph allows it. gemm_device (TensorRT dialect): the
    zqcompile.plugins.gemm_kernels.GemmDevice the GEMM plugins' kernel plans are for (see to_onnx_model)."""
    if dialect not in DIALECTS:
        raise ExportError(f"unknown ONNX dialect {dialect!r}; choose one of {DIALECTS}")
    src = resolve_source(engine, example_inputs, input_names)
    model = to_onnx_model(src, dialect, dynamic, gemm_device)
    return save_atomic(model, path)
