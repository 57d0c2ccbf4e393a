"""TensorRT lowering: the TensorRT-dialect ONNX (fused zq ops as `zq.trt` plugin nodes) is parsed by TensorRT's
ONNX parser with zqcompile's plugin library loaded, built with FP16 + INT8 enabled and dynamic batch/seq
profiles, and saved as a plan; `load_tensorrt` runs a plan with the engine's call signature.

TensorRT cannot be installed on our build machines (docs/facts.md): these paths are written against the
documented TensorRT 10 Python API, gated on `import tensorrt`, and tested up to the TensorRT calls.
"""
from __future__ import annotations

import ctypes
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import torch

from zqcompile.export.onnx import ExportError, Exportable, resolve_source, save_atomic, to_onnx_model
from zqcompile.errors import TensorRTUnavailable  # noqa: F401 - raised here, defined there

PLUGIN_LIBRARY_ENV = "ZQ_TRT_PLUGIN_LIB"
_DEFAULT_PLUGIN_LIBRARY = Path(__file__).resolve().parents[2] / "build" / "plugins_cuda" / "tensorrt" / "libzq_trt_plugins.so"


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTUnavailable(
            "TensorRT export/run needs the `tensorrt` Python package (TensorRT >= 10 with its builder and ONNX "
            "parser, e.g. `pip install tensorrt` where NVIDIA's package index is reachable); it is not installed. "
            "zq.export_onnx(engine, path, dialect='tensorrt') writes the plugin-node ONNX without it.") from e
    return tensorrt


def plugin_library_path(path: Union[str, os.PathLike, None] = None) -> Path:
    p = Path(path or os.environ.get(PLUGIN_LIBRARY_ENV) or _DEFAULT_PLUGIN_LIBRARY)
    if not p.is_file():
        raise TensorRTUnavailable(
            f"zqcompile's TensorRT plugin library is not at {p}: build it with CMake (plugins_cuda/tensorrt, "
            f"option ZQ_BUILD_TRT_PLUGINS, needs TensorRT headers) and pass plugin_library= or set {PLUGIN_LIBRARY_ENV}")
    return p


def load_plugins(trt, library: Path) -> None:
    """Load our creators (they self-register via REGISTER_TENSORRT_PLUGIN) next to TensorRT's own."""
    trt.init_libnvinfer_plugins(trt.Logger(trt.Logger.WARNING), "")
    ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)


@dataclass(frozen=True)
class ShapeRange:
    """Optimization-profile bounds for the dynamic batch and sequence axes."""
    max_batch: int = 32
    max_seq: int = 512


def _profile_shapes(x: torch.Tensor, rng: ShapeRange) -> tuple[tuple, tuple, tuple]:
    shape = tuple(x.shape)
    dyn_max = (rng.max_batch, rng.max_seq)
    lo = tuple(1 if i < 2 else d for i, d in enumerate(shape))
    hi = tuple(max(dyn_max[i], d) if i < 2 else d for i, d in enumerate(shape))
    return lo, shape, hi


def build_plan(trt, onnx_path: Path, src_inputs: Sequence[torch.Tensor], input_names: Sequence[str],
               rng: ShapeRange) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT's ONNX parser rejected the TensorRT-dialect model: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.INT8)  # plugin I/O in int8; scales are explicit, no calibrator
    profile = builder.create_optimization_profile()
    for name, x in zip(input_names, src_inputs):
        profile.set_shape(name, *_profile_shapes(x, rng))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError("TensorRT failed to build the engine (see the TensorRT log above)")
    return bytes(plan)


def _write_atomic(data: bytes, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_tensorrt(engine: Exportable, path: Union[str, os.PathLike], plugin_library: Union[str, os.PathLike, None] = None,
                    shape_range: ShapeRange = ShapeRange(), example_inputs: Sequence[Any] | None = None) -> Path:
    """Build a TensorRT plan from a compiled engine: TensorRT-dialect ONNX -> TensorRT's ONNX parser with our
    plugins -> FP16 + INT8 engine with dynamic batch/seq -> `path` (and `path`.json: I/O names, plugins)."""
    trt = import_tensorrt()
    library = plugin_library_path(plugin_library)
    path = Path(path)
    if not path.parent.is_dir():
        raise ExportError(f"cannot write {path}: folder {path.parent} does not exist")
    load_plugins(trt, library)
    src = resolve_source(engine, example_inputs, None)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = save_atomic(to_onnx_model(src, "tensorrt"), Path(tmp) / "model.trt.onnx")
        plan = build_plan(trt, onnx_path, src.example_inputs, src.input_names, shape_range)
    meta = {"input_names": src.input_names, "plugin_library": str(library), "format": "zqcompile-tensorrt-1"}
    _write_atomic(json.dumps(meta, indent=1).encode(), path.with_name(path.name + ".json"))
    _write_atomic(plan, path)
    return path


class TensorRTEngine:
    """A deserialized plan, called like the engine: positional CUDA (or CPU, copied) tensors -> outputs."""

    def __init__(self, trt, engine, input_names: list[str]):
        self._trt, self._engine, self.input_names = trt, engine, input_names
        self._context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def __call__(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        stream = torch.cuda.current_stream()
        keep = []
        for name, x in zip(self.input_names, inputs):
            x = x.cuda().contiguous()
            keep.append(x)
            self._context.set_input_shape(name, tuple(x.shape))
            self._context.set_tensor_address(name, x.data_ptr())
        outs = []
        for name in self.output_names:
            shape = tuple(self._context.get_tensor_shape(name))
            dtype = _TORCH_DTYPE[self._engine.get_tensor_dtype(name).name]
            y = torch.empty(shape, dtype=dtype, device="cuda")
            self._context.set_tensor_address(name, y.data_ptr())
            outs.append(y)
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see the TensorRT log)")
        stream.synchronize()
        return outs[0] if len(outs) == 1 else tuple(outs)


_TORCH_DTYPE = {"FLOAT": torch.float32, "HALF": torch.float16, "INT8": torch.int8, "INT32": torch.int32,
                "INT64": torch.int64, "BOOL": torch.bool, "BF16": torch.bfloat16}


def load_tensorrt(path: Union[str, os.PathLike], plugin_library: Union[str, os.PathLike, None] = None) -> TensorRTEngine:
    """Load a plan written by export_tensorrt; call it with the compiled engine's positional inputs."""
    trt = import_tensorrt()
    path = Path(path)
    meta_path = path.with_name(path.name + ".json")
    if not path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"no TensorRT plan {path} (with {meta_path.name}) written by zq.export_tensorrt")
    meta = json.loads(meta_path.read_text())
    load_plugins(trt, plugin_library_path(plugin_library or meta.get("plugin_library")))
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not deserialize {path} (TensorRT version or plugins differ)")
    return TensorRTEngine(trt, engine, list(meta["input_names"]))
