"""zqcompile: ZeroQuant post-training quantization compiler for transformer models."""
from . import ops  # registers the zq ops
from .api import compile, dump, load
from .backends.onnx import export_onnx
from .backends.tensorrt import export_tensorrt, load_tensorrt
from .capture import CaptureError, InputError
from .engine import Engine, EngineFileError
from .passes import WeightError
from .config import (ActQuant, ConfigError, ConfigWarning, GemmScheme, LKDConfig, PRESETS, QuantConfig, WeightQuant,
                     get_config)

__all__ = ["compile", "dump", "load", "export_onnx", "export_tensorrt", "load_tensorrt", "Engine", "EngineFileError", "CaptureError", "InputError", "WeightError",
           "ActQuant", "ConfigError", "ConfigWarning", "GemmScheme", "LKDConfig", "PRESETS", "QuantConfig", "WeightQuant",
           "get_config", "ops"]
