"""token_wise_quant: insert activation quantization in front of every GEMM whose plan quantizes its input.

Matches: `aten.linear(x, zq.dequantize_weight(...), b)` with act mode "token" (dynamic, per token: ZeroQuant)
or "tensor" (static per-tensor, scale calibrated later). GEMMs sharing one input (q, k, v) share one quant
node. Emits: `x -> zq.quantize_per_token | zq.quantize_per_tensor -> zq.dequantize_per_token -> linear`.
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
    inserted: dict[tuple[fx.Node, str], fx.Node] = {}
    for node in calls(gm, aten.linear.default):
        if (m := match(QUANTIZED_GEMM, node)) is None:
            continue
        matched += 1
        info = node.meta["zq_gemm"]
        x, mode = m["x"], info.scheme.act.mode
        key = (x, mode)
        if key not in inserted:
            g = gm.graph
            if mode == "token":
                with g.inserting_after(x):
                    qnode = g.call_function(zq.quantize_per_token.default, (x,))
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
