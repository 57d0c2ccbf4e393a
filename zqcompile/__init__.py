"""zqcompile: ZeroQuant post-training quantization compiler for transformer models."""
from . import ops  # registers the zq ops
from .config import (ActQuant, ConfigError, GemmScheme, LKDConfig, PRESETS, QuantConfig, WeightQuant,
                     get_config)

__all__ = ["ActQuant", "ConfigError", "GemmScheme", "LKDConfig", "PRESETS", "QuantConfig", "WeightQuant",
           "get_config", "ops"]
