"""fold_decomposed_ops: recognise ops that models write out by hand and give them back their one-op form,
so the fusion passes (and kernels) see them: Hugging Face's RMSNorm (pow -> mean -> add eps -> rsqrt -> mul
-> mul weight) becomes `aten.rms_norm`, and so does Gemma's, which scales by (1 + weight): its weight becomes
the constant 1 + weight; GPT-2's tanh GeLU ("gelu_new", 0.5*x*(1+tanh(...))) becomes
`aten.gelu(approximate="tanh")`. Export's dtype asserts and same-dtype casts are dropped first.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import fx

from zqcompile.passes.base import (PassContext, PassResult, add_constant, arg, aten, copy_meta, dtype_of, get_tensor,
                                   is_call, param_name)
from zqcompile.passes.match import Match, P, Rule, rewrite, substitute

_TO = (aten.to.dtype, aten._to_copy.default)


def _cast(p: P) -> P:
    return P(_TO, p) | p  # p, or p cast to another dtype


def _vector_constant(weight) -> bool:
    t = get_tensor(weight.graph.owning_module, weight) if isinstance(weight, fx.Node) else None
    return t is not None and t.dim() == 1


def _is_number(eps) -> bool:
    return isinstance(eps, (int, float))


X = P.any("x")
# weight * cast(rsqrt(mean(x ** 2, -1, keepdim=True) + eps) * x)
INV_RMS = P(aten.rsqrt.default, P(aten.add.Tensor, P(aten.mean.dim, P(aten.pow.Tensor_Scalar, X, P.num(2)), [-1], True),
                                  P.any("eps", where=_is_number)))
RMS_NORM = P(aten.mul.Tensor, P.any("weight", where=_vector_constant),
             _cast(P(aten.mul.Tensor, INV_RMS, X, commute=True)), commute=True)
# Gemma: (rsqrt(mean(x ** 2, -1, keepdim=True) + eps) * x) * (1 + cast(weight)), normalised and scaled in fp32
ONE_PLUS_WEIGHT = P(aten.add.Tensor, _cast(P.any("weight", where=_vector_constant)), P.num(1.0), name="one_plus",
                    commute=True)
RMS_NORM_ONE_PLUS = P(aten.mul.Tensor, P(aten.mul.Tensor, INV_RMS, X, commute=True), ONE_PLUS_WEIGHT, commute=True)
# (x * 0.5) * (tanh((x + x ** 3 * 0.044715) * sqrt(2 / pi)) + 1)
CUBIC = P(aten.add.Tensor, X, P(aten.mul.Tensor, P(aten.pow.Tensor_Scalar, X, P.num(3)), P.num(0.044715)))
TANH = P(aten.tanh.default, P(aten.mul.Tensor, CUBIC, P.num(math.sqrt(2 / math.pi), 1e-5)))
TANH_GELU = P(aten.mul.Tensor, P(aten.mul.Tensor, X, P.num(0.5)), P(aten.add.Tensor, TANH, P.num(1.0)), commute=True)


def _erase(gm: fx.GraphModule, m: Match) -> None:
    gm.graph.erase_node(m.root)


def _bypass(gm: fx.GraphModule, m: Match) -> None:
    substitute(gm, m.root, m["x"])


def _replace_with(gm: fx.GraphModule, node: fx.Node, target, args: tuple, kwargs: dict | None = None) -> None:
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args, kwargs or {})
    copy_meta(new, node)
    new.meta["val"] = node.meta.get("val")
    node.replace_all_uses_with(new)  # the decomposed ops die in the dead-code pass


def _rms_norm(gm: fx.GraphModule, m: Match) -> None:
    x = arg(m["x"], "self") if is_call(m["x"], *_TO) else m["x"]
    weight = m["weight"]
    _replace_with(gm, m.root, aten.rms_norm.default, (x, [get_tensor(gm, weight).shape[0]], weight, float(m["eps"])))


def plus_one(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Gemma's RMSNorm weight as the norm multiplies by it: 1 + w, in the graph's dtype."""
    return w.detach().to(dtype) + 1.0


def _rms_norm_one_plus(ctx: PassContext, gm: fx.GraphModule, m: Match) -> None:
    """x keeps its cast: Gemma normalises in fp32 whatever the model's dtype, and the weight is 1 + weight in
    the dtype the model adds it in (made once for the engine's and the generation graphs)."""
    w, dtype = get_tensor(gm, m["weight"]), dtype_of(m["one_plus"])
    one_plus = ctx.constants.derive(plus_one, w, dtype)
    weight = add_constant(gm, m["weight"].target + "_plus_one", one_plus, before=m.root)
    weight.meta["zq_param"], weight.meta["zq_param_offset"] = param_name(m["weight"]), 1.0
    _replace_with(gm, m.root, aten.rms_norm.default, (m["x"], [w.shape[0]], weight, float(m["eps"])))


def _tanh_gelu(gm: fx.GraphModule, m: Match) -> None:
    _replace_with(gm, m.root, aten.gelu.default, (m["x"],), {"approximate": "tanh"})


DROPS = [
    Rule(P(aten._assert_tensor_metadata.default), _erase, "assert"),
    # x.to(x's own dtype), spelled without options
    Rule(P(aten.to.dtype, P.node("x"), P.any("dtype"), name="cast",
           where=lambda cast, x, dtype: not cast.kwargs and dtype_of(x, None) == dtype), _bypass, "no-op cast"),
    # x.type_as(other) where both already have one dtype (Gemma's norms)
    Rule(P(aten.type_as.default, P.node("x"), P.node("other"),
           where=lambda x, other: dtype_of(x, None) is not None and dtype_of(x, None) == dtype_of(other, None)),
         _bypass, "no-op cast"),
]


def _folds(ctx: PassContext) -> list[Rule]:
    return [
        Rule(RMS_NORM, _rms_norm, "rms_norm"),
        Rule(RMS_NORM_ONE_PLUS, partial(_rms_norm_one_plus, ctx), "rms_norm"),
        Rule(TANH_GELU, _tanh_gelu, "gelu_tanh"),
    ]


def fold_decomposed_ops(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    dropped = rewrite(gm, ctx, DROPS, list(gm.graph.nodes)).rewritten
    folded = rewrite(gm, ctx, _folds(ctx), list(gm.graph.nodes))
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    rms, gelu = folded.kinds["rms_norm"], folded.kinds["gelu_tanh"]
    notes = [f"{rms} RMSNorm, {gelu} tanh-GeLU folded", f"{dropped} export asserts / no-op casts dropped"]
    return PassResult(gm, bool(rms or gelu or dropped), rms + gelu, rms + gelu, notes)
