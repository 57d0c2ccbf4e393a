"""Op schemas and reference implementations of zqcompile's quantized ops (namespace `zq`).

Importing this package registers the ops with torch.library. `quant_math` holds the formulas.
"""
from . import quant_math
from .library import GENERATION_OPS, NAMESPACE, OPS

__all__ = ["GENERATION_OPS", "NAMESPACE", "OPS", "quant_math"]
