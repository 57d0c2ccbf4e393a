"""fuse_gemm_epilogue: move what directly follows a quantized GEMM into its epilogue, so the float result is
written once: an activation (gelu / relu / silu) when the GEMM's only user is it, then a residual add of a
same-shape tensor.

Matches `act(zq_gemm(...))` and `add(zq_gemm(...), r)`; emits the same zq GEMM with `act` / `residual` set.
"""
from __future__ import annotations

from torch import fx

from zqcompile.passes.base import (PassContext, PassResult, act_of, arg, aten, calls, dtype_of, gemm_fqn, set_arg,
                                   shape_of, zq)
from zqcompile.passes.match import Fused, Match, P, Rule, rewrite, substitute

GEMMS = (zq.int8_gemm_dequant.default, zq.fp8_gemm_dequant.default, zq.weight_only_gemm.default)
ALONE = P.node("gemm", where=lambda gemm: len(gemm.users) == 1)  # the GEMM, read by nothing else
NO_ACT = P.node("gemm", where=lambda gemm: len(gemm.users) == 1 and arg(gemm, "act") == "none")


def _set_act(gm: fx.GraphModule, m: Match) -> Fused:
    gemm, act = m["gemm"], m.root
    set_arg(gemm, "act", act_of(act))
    gemm.meta["val"] = act.meta.get("val")
    substitute(gm, act, gemm)
    return Fused(gemm, str(gemm.target.name()))


def _set_residual(gm: fx.GraphModule, m: Match) -> Fused:
    gemm = m["gemm"]
    set_arg(gemm, "residual", m["residual"])
    substitute(gm, m.root, gemm)
    return Fused(gemm, str(gemm.target.name()))


def _same_tensor(r, gemm: fx.Node) -> bool:
    return isinstance(r, fx.Node) and shape_of(r) == shape_of(gemm) and dtype_of(r) == dtype_of(gemm)


EPILOGUES = [  # matched at the GEMM's consumer, each in turn: an activation, then a residual add
    Rule(P(aten.gelu.default, NO_ACT, approximate="none"), _set_act, "epilogue:gelu"),
    Rule(P(aten.gelu.default, NO_ACT, approximate="tanh"), _set_act, "epilogue:gelu_tanh"),
    Rule(P(aten.relu.default, NO_ACT), _set_act, "epilogue:relu"),
    Rule(P(aten.silu.default, NO_ACT), _set_act, "epilogue:silu"),
    Rule(P(aten.add.Tensor, ALONE, P.any("residual"), alpha=1, commute=True), _set_residual, "epilogue:residual",
         candidate="residual add", unless=(
             (lambda residual, gemm: not _same_tensor(residual, gemm), "the other operand is not a same-shape tensor"),
             (lambda residual, gemm: not residual < gemm, "residual is computed after the GEMM"))),
]


def fuse_gemm_epilogue(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    done = rewrite(gm, ctx, EPILOGUES, calls(gm, *GEMMS), fqn=gemm_fqn, consumers_of="gemm", all_rules=True)
    gm.graph.lint()
    return PassResult(gm, done.rewritten > 0, done.matched, done.rewritten)
