"""token_wise_quant: insert activation quantization in front of every GEMM whose plan quantizes its input.

Matches: `aten.linear(x, zq.dequantize_weight(...), b)` with act mode "token" (dynamic, per token: ZeroQuant)
or "tensor" (static per-tensor, scale calibrated later), INT8 or FP8 E4M3 codes (act dtype "fp8": dynamic per
token). GEMMs sharing one input and activation scheme (q, k, v) share one quant node. Emits: `x ->
zq.quantize_per_token | zq.quantize_per_token_fp8 | zq.quantize_per_tensor -> zq.dequantize_per_token -> linear`.
"""
from __future__ import annotations

import torch
from torch import fx

from zqcompile.passes.base import (PassContext, PassResult, add_constant, aten, calls, copy_meta, dtype_of, getitems,
                                   set_arg, zq)
from zqcompile.passes.match import P, match


def _quantizes_input(gemm: fx.Node) -> bool:
    info = gemm.meta.get("zq_gemm")
    return info is not None and not info.scheme.is_float and info.scheme.act.mode != "none"


QUANTIZED_GEMM = P(aten.linear.default, P.any("x"), P(zq.dequantize_weight.default), name="gemm",
                   where=_quantizes_input)


def token_wise_quant(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    matched = rewritten = 0
    inserted: dict[tuple[fx.Node, str, str], fx.Node] = {}
    for node in calls(gm, aten.linear.default):
        if (m := match(QUANTIZED_GEMM, node)) is None:
            continue
        matched += 1
        info = node.meta["zq_gemm"]
        x, mode, dtype = m["x"], info.scheme.act.mode, info.scheme.act.dtype
        key = (x, mode, dtype)
        if key not in inserted:
            g = gm.graph
            if mode == "token":
                quantize = zq.quantize_per_token_fp8 if dtype == "fp8" else zq.quantize_per_token
                with g.inserting_after(x):
                    qnode = g.call_function(quantize.default, (x,))
            else:
                scale = add_constant(gm, info.fqn + ".act_scale", torch.ones((), dtype=torch.float32),
                                     before=x.next)
                with g.inserting_after(scale):
                    qnode = g.call_function(zq.quantize_per_tensor.default, (x, scale))
                qnode.meta["zq_calibrate"] = scale.target
            copy_meta(qnode, node)
            qnode.meta.pop("zq_gemm", None)
            q, s = getitems(gm, qnode, 2)
            with g.inserting_after(s):
                dq = g.call_function(zq.dequantize_per_token.default, (q, s, dtype_of(x)))
            copy_meta(dq, qnode)
            inserted[key] = dq
        set_arg(node, "input", inserted[key])
        rewritten += 1
    gm.graph.lint()
    return PassResult(gm, rewritten > 0, matched, rewritten, [f"{len(inserted)} activation quant nodes"])
