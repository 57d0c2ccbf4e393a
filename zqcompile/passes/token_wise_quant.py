"""token_wise_quant: insert activation quantization in front of every GEMM whose plan quantizes its input.

Matches: `aten.linear(x, zq.dequantize_weight(...), b)` with act mode "token" (dynamic, per token: ZeroQuant)
or "tensor" (static per-tensor, scale calibrated later). GEMMs sharing one input (q, k, v) share one quant
node. Emits: `x -> zq.quantize_per_token | zq.quantize_per_tensor -> zq.dequantize_per_token -> linear`.
"""
from __future__ import annotations

import torch
from torch import fx

from zqcompile.passes.base import PassContext, PassResult, add_constant, aten, calls, copy_meta, dtype_of, getitems, is_call, zq


def token_wise_quant(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    matched = rewritten = 0
    inserted: dict[tuple[fx.Node, str], fx.Node] = {}
    for node in calls(gm, aten.linear.default):
        info = node.meta.get("zq_gemm")
        if info is None or info.scheme.is_float or info.scheme.act.mode == "none":
            continue
        if not is_call(node.args[1], zq.dequantize_weight.default):
            continue
        matched += 1
        x, mode = node.args[0], info.scheme.act.mode
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
        node.args = (inserted[key], *node.args[1:])
        rewritten += 1
    gm.graph.lint()
    return PassResult(gm, rewritten > 0, matched, rewritten, [f"{len(inserted)} activation quant nodes"])
