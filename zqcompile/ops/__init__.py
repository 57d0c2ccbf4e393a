"""Op declarations and reference implementations of zqcompile's quantized ops (namespace `zq`).

Importing this package declares the ops (zqcompile/ops/library.py) in the registry (zqcompile/ops/registry.py)
and with torch.library. `quant_math` holds the formulas. OPS (exported ops) and GENERATION_OPS (runtime-only
ops: the generation graphs', the all-reduce of tensor parallelism) map names to overloads; both are read from the registry.
"""
from zqcompile.ops import library, quant_math, registry
from zqcompile.ops.registry import NAMESPACE

OPS = {d.name: d.overload for d in registry.declared() if d.exported}
# Ops only the engine's runtime runs (no ONNX / TensorRT lowering): the generation graphs' attention around the
# KV cache, and the all-reduce of tensor-parallel engines.
GENERATION_OPS = {d.name: d.overload for d in registry.declared() if not d.exported}

__all__ = ["GENERATION_OPS", "NAMESPACE", "OPS", "library", "quant_math", "registry"]
