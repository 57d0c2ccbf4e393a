"""Op schemas and reference implementations of zqcompile's quantized ops (namespace `zq`).

Importing this package registers the ops with torch.library. `quant_math` holds the formulas.
"""
from zqcompile.ops import quant_math
from zqcompile.ops.library import GENERATION_OPS, NAMESPACE, OPS

__all__ = ["GENERATION_OPS", "NAMESPACE", "OPS", "quant_math"]
