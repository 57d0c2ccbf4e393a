"""fuse_gemm_epilogue: move what directly follows a quantized GEMM into its epilogue, so the float result is
written once: an activation (gelu / relu / silu) when the GEMM's only user is it, then a residual add of a
same-shape tensor.

Matches `act(zq_gemm(...))` and `add(zq_gemm(...), r)`; emits the same zq GEMM with `act` / `residual` set.
"""
from __future__ import annotations

from torch import fx

from zqcompile.passes.base import (ACTIVATION_OPS, FusionRecord, NotFused, PassContext, PassResult, act_of, aten, calls, dtype_of,
                   fqn_of, is_call, shape_of, zq)

GEMMS = (zq.int8_gemm_dequant.default, zq.weight_only_gemm.default)
_ACT_ARG, _RES_ARG = {GEMMS[0]: 6, GEMMS[1]: 5}, {GEMMS[0]: 5, GEMMS[1]: 4}


def _set(node: fx.Node, index: int, value) -> None:
    args = list(node.args)
    args[index] = value
    node.args = tuple(args)


def _only_user(node: fx.Node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _order(gm: fx.GraphModule) -> dict:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def fuse_gemm_epilogue(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    matched = rewritten = 0
    for gemm in calls(gm, *GEMMS):
        info = gemm.meta.get("zq_gemm")
        fqn = info.fqn if info else fqn_of(gemm)
        user = _only_user(gemm)
        if is_call(user, *ACTIVATION_OPS) and gemm.args[_ACT_ARG[gemm.target]] == "none":
            matched += 1
            act = act_of(user)
            _set(gemm, _ACT_ARG[gemm.target], act)
            gemm.meta["val"] = user.meta.get("val")
            user.replace_all_uses_with(gemm)
            gm.graph.erase_node(user)
            ctx.fusions.append(FusionRecord(f"epilogue:{act}", fqn, [f"aten.{act.split('_')[0]}"], str(gemm.target.name())))
            rewritten += 1
            user = _only_user(gemm)
        if is_call(user, aten.add.Tensor) and len(user.args) == 2 and not user.kwargs:
            matched += 1
            other = user.args[1] if user.args[0] is gemm else user.args[0]
            if not isinstance(other, fx.Node) or shape_of(other) != shape_of(gemm) or dtype_of(other) != dtype_of(gemm):
                ctx.not_fused.append(NotFused("residual add", fqn, "the other operand is not a same-shape tensor"))
                continue
            if _order(gm)[other] > _order(gm)[gemm]:
                ctx.not_fused.append(NotFused("residual add", fqn, "residual is computed after the GEMM"))
                continue
            _set(gemm, _RES_ARG[gemm.target], other)
            user.replace_all_uses_with(gemm)
            gm.graph.erase_node(user)
            ctx.fusions.append(FusionRecord("epilogue:residual", fqn, ["aten.add"], str(gemm.target.name())))
            rewritten += 1
    gm.graph.lint()
    return PassResult(gm, rewritten > 0, matched, rewritten)
