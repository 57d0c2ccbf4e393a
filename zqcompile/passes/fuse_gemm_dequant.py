"""fuse_gemm_dequant: turn each QDQ GEMM into one op with the dequantization in its epilogue (ZeroQuant
Fig. 2): int32 acc x token scale x weight scale (+ bias) -> float, written once.

Matches `linear(dequantize_per_token(q, s), dequantize_weight(wq, ws), b)` -> `zq.int8_gemm_dequant`, and
`linear(x, dequantize_weight(wq, ws), b)` (A16) -> `zq.weight_only_gemm`.
"""
from __future__ import annotations

from torch import fx

from zqcompile.passes.base import FusionRecord, PassContext, PassResult, aten, calls, copy_meta, dtype_of, is_call, zq


def fuse_gemm_dequant(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    matched = rewritten = 0
    g = gm.graph
    for lin in calls(gm, aten.linear.default):
        x, w = lin.args[:2]
        bias = lin.args[2] if len(lin.args) > 2 else None
        if not is_call(w, zq.dequantize_weight.default):
            continue
        matched += 1
        wq, ws, bits, _ = w.args
        info = lin.meta.get("zq_gemm")
        if is_call(x, zq.dequantize_per_token.default):
            q, s, _ = x.args
            with g.inserting_before(lin):
                fused = g.call_function(zq.int8_gemm_dequant.default,
                                        (q, s, wq, ws, bias, None, "none", bits, dtype_of(lin)))
            name, replaced = "zq.int8_gemm_dequant", ["zq.dequantize_per_token", "zq.dequantize_weight", "aten.linear"]
        else:
            with g.inserting_before(lin):
                fused = g.call_function(zq.weight_only_gemm.default, (x, wq, ws, bias, None, "none", bits))
            name, replaced = "zq.weight_only_gemm", ["zq.dequantize_weight", "aten.linear"]
        copy_meta(fused, lin)
        fused.meta["val"] = lin.meta.get("val")
        lin.replace_all_uses_with(fused)
        g.erase_node(lin)
        for dead in (w, x):
            if is_call(dead, zq.dequantize_weight.default, zq.dequantize_per_token.default) and not dead.users:
                g.erase_node(dead)
        if info is not None:
            info.kernel = name
        ctx.fusions.append(FusionRecord("gemm+dequant", info.fqn if info else "", replaced, name))
        rewritten += 1
    g.lint()
    return PassResult(gm, rewritten > 0, matched, rewritten)
