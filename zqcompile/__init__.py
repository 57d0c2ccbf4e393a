"""zqcompile: ZeroQuant post-training quantization compiler for transformer models.

The public names resolve on first use (PEP 562), so the `zqcompile` command starts (and answers --help, a
bad argument or Ctrl-C) before torch and transformers are imported.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "compile": "api", "compile_folder": "api", "dump": "api", "load": "api", "CacheSpec": "generation.kv_cache",
    "TensorParallel": "parallel.group",
    "export_onnx": "export.onnx", "export_compressed_tensors": "export.compressed_tensors",
    "import_compressed_tensors": "export.compressed_tensors_import", "export_tensorrt": "export.tensorrt", "load_tensorrt": "export.tensorrt",
    "CaptureError": "capture", "InputError": "capture",
    "Engine": "runtime.engine", "EngineFileError": "runtime.engine",
    "WeightError": "passes",
    "AccuracyBudget": "config", "ActQuant": "config", "AttentionQuant": "config", "FeatureScales": "config", "ConfigError": "config", "ConfigWarning": "config", "GemmScheme": "config", "LKDConfig": "config",
    "PRESETS": "config", "QuantConfig": "config", "WeightQuant": "config", "get_config": "config",
    "OutputPathError": "files", "TensorParallelError": "errors", "ExportError": "errors", "ModelLoadError": "errors",
}

__all__ = [*_EXPORTS, "ops"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name == "ops":
        value = importlib.import_module(".ops", __name__)  # registers the zq ops
    else:
        raise AttributeError(f"module 'zqcompile' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
