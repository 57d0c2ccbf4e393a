"""fuse_gemm_dequant: turn each QDQ GEMM into one op with the dequantization in its epilogue (ZeroQuant
Fig. 2): int32 acc x token scale x weight scale (+ bias) -> float, written once.

Matches `linear(dequantize_per_token(q, s), dequantize_weight(wq, ws), b)` -> `zq.int8_gemm_dequant` (int8 q and
wq) or `zq.fp8_gemm_dequant` (FP8 q and wq), and `linear(x, dequantize_weight(wq, ws), b)` (A16) ->
`zq.weight_only_gemm`. FP8 activations into INT8 weights (no GEMM multiplies those two) keep their
dequantization, so the A16 GEMM reads the FP8-rounded activations; cleanup reports that QDQ node.
"""
from __future__ import annotations

from torch import fx

import torch

from zqcompile.passes.base import PassContext, PassResult, aten, calls, copy_meta, dtype_of, gemm_fqn, zq
from zqcompile.passes.match import Fused, Match, P, Rule, erase_unused, op_name, rewrite, substitute



def _weight(dtype: torch.dtype) -> P:
    return P(zq.dequantize_weight.default, P.any("wq", where=lambda wq: dtype_of(wq) == dtype), P.any("ws"),
             P.any("bits"))


def _acts(dtype: torch.dtype) -> P:
    return P(zq.dequantize_per_token.default, P.any("q", where=lambda q: dtype_of(q) == dtype), P.any("s"))


W, W_FP8 = _weight(torch.int8) | _weight(torch.uint8), _weight(torch.float8_e4m3fn)  # uint8: packed INT4
A8, A_FP8 = _acts(torch.int8), _acts(torch.float8_e4m3fn)


def _two_level(node: fx.Node) -> bool:
    """The GEMM's INT4 K-group scales are two-level (WeightQuant.group_scales): the op is told, so a kernel may
    run it as an INT8 GEMM with row scales."""
    info = node.meta.get("zq_gemm")
    return info is not None and getattr(info.scheme.weight, "group_scales", "fp32") == "two-level"


def _int8_gemm_dequant(gm: fx.GraphModule, m: Match) -> Fused:
    args = (m["q"], m["s"], m["wq"], m["ws"], m["bias"], None, "none", m["bits"], dtype_of(m.root))
    return _emit(gm, m, zq.int8_gemm_dequant.default, args + ((True,) if _two_level(m.root) else ()))


def _fp8_gemm_dequant(gm: fx.GraphModule, m: Match) -> Fused:
    return _emit(gm, m, zq.fp8_gemm_dequant.default,
                 (m["q"], m["s"], m["wq"], m["ws"], m["bias"], None, "none", dtype_of(m.root)))


def _weight_only_gemm(gm: fx.GraphModule, m: Match) -> Fused:
    return _emit(gm, m, zq.weight_only_gemm.default, (m["x"], m["wq"], m["ws"], m["bias"], None, "none", m["bits"]))


RULES = [  # at each aten.linear, the first that matches
    Rule(P(aten.linear.default, A8, W, P.any("bias")), _int8_gemm_dequant, "gemm+dequant"),
    Rule(P(aten.linear.default, A_FP8, W_FP8, P.any("bias")), _fp8_gemm_dequant, "gemm+dequant"),
    Rule(P(aten.linear.default, P.any("x"), W, P.any("bias")), _weight_only_gemm, "gemm+dequant"),
]


def _emit(gm: fx.GraphModule, m: Match, op, args: tuple) -> Fused:
    lin = m.root
    with gm.graph.inserting_before(lin):
        fused = gm.graph.call_function(op, args)
    name = op_name(fused)
    copy_meta(fused, lin)
    fused.meta["val"] = lin.meta.get("val")
    substitute(gm, lin, fused)
    erase_unused(gm, m.inner)
    if (info := fused.meta.get("zq_gemm")) is not None:
        info.kernel = name
    return Fused(fused, name)


def fuse_gemm_dequant(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    done = rewrite(gm, ctx, RULES, calls(gm, aten.linear.default), fqn=gemm_fqn)
    gm.graph.lint()
    return PassResult(gm, done.rewritten > 0, done.matched, done.rewritten)
