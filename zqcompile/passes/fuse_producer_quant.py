"""fuse_producer_quant: fuse token-wise quantization into the op that produces the activation (ZeroQuant
Sec. 4.3), so one kernel reads the float input and writes int8 + per-token scales.

Matches `zq.quantize_per_token(p)` where p is: `layer_norm` / `rms_norm` (with a residual `add` in front of
it when there is one), `gelu`, `relu`, `silu`, or a gated MLP's `mul(act(gate), up)` (SiLU: LLaMA; tanh-GeLU:
Gemma). Emits `zq.norm_quant` / `zq.act_quant` (from `zq.quantize_per_token_fp8`: `zq.norm_quant_fp8` /
`zq.act_quant_fp8`, whose kernels write FP8 E4M3 codes); the float output (and the residual sum) are emitted
only when another consumer still needs them.
A view / reshape that keeps the last dim (the token's row) between producer and quant is moved after the quant
first: per-token quantization commutes with it (Mixtral's experts read the norm's output as [tokens, hidden]).
"""
from __future__ import annotations

from torch import fx

from zqcompile.passes.base import (PassContext, PassResult, act_of, aten, calls, copy_meta, fqn_of, getitems, last_of,
                                   shape_of, zq)
from zqcompile.passes.match import Fused, Match, P, Rule, erase_unused, match, op_name, rewrite

NORMS = {aten.layer_norm.default: "layer", aten.rms_norm.default: "rms"}
X = P.any("x")
# a residual sum of two same-shape tensors, which the norm kernel can compute (and emit) itself
RESIDUAL = P(aten.add.Tensor, P.node("a"), P.node("b"), alpha=1, name="x",
             where=lambda a, b: bool(shape_of(a)) and shape_of(a) == shape_of(b))


def gated(act: P) -> P:
    """act(gate) * up, the activation named "act" (act_of reads it), up of the same shape."""
    return P(aten.mul.Tensor, act, P.node("x"), name="prod", commute=True,
             where=lambda act, x: shape_of(act) == shape_of(x))


def gelu(x: P, approximate: str, name: str = "prod") -> P:
    return P(aten.gelu.default, x, approximate=approximate, name=name)


# per-token quantization -> the fused (norm, activation) ops that emit its codes
FUSED = {zq.quantize_per_token.default: (zq.norm_quant.default, zq.act_quant.default),
         zq.quantize_per_token_fp8.default: (zq.norm_quant_fp8.default, zq.act_quant_fp8.default)}


def quant(prod: P) -> P:
    return P(tuple(FUSED), prod)


def layer_norm(x: P) -> P:
    return P(aten.layer_norm.default, x, weight=P.any("weight"), bias=P.any("bias"), eps=P.any("eps"), name="prod")


def rms_norm(x: P) -> P:
    return P(aten.rms_norm.default, x, weight=P.any("weight"), eps=P.any("eps"), name="prod")


def _others(node: fx.Node, exclude: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u is not exclude]


def _rewire(gm: fx.GraphModule, quant: fx.Node, fused: fx.Node, n_out: int) -> list[fx.Node]:
    """The quant's (q, scale) users now read the fused op's first two outputs; returns all its outputs."""
    outs = getitems(gm, fused, n_out)
    for user in list(quant.users):  # getitem(quant, 0 | 1)
        i = user.args[1]
        outs[i].meta["val"] = user.meta.get("val")
        user.replace_all_uses_with(outs[i])
        gm.graph.erase_node(user)
    gm.graph.erase_node(quant)
    return outs


def _norm_quant(gm: fx.GraphModule, m: Match) -> Fused:
    """[add ->] norm -> quantize_per_token becomes norm_quant(x, residual, weight, bias, eps, kind, emit_out,
    emit_sum)."""
    quant, norm, x, residual = m.root, m["prod"], m["x"], "a" in m
    kind, eps = NORMS[norm.target], 1e-5 if m["eps"] is None else m["eps"]
    norm_users = _others(norm, quant)
    sum_users = _others(x, norm) if residual else []
    inputs = ((m["a"], m["b"]) if residual else (x, None)) + (m["weight"], m.get("bias"))
    with gm.graph.inserting_after(last_of(inputs)):
        fused = gm.graph.call_function(FUSED[quant.target][0],
                                       (*inputs, float(eps), kind, bool(norm_users), bool(sum_users)))
    copy_meta(fused, norm)
    _, _, out, hsum = _rewire(gm, quant, fused, 4)
    out.meta["val"], hsum.meta["val"] = norm.meta.get("val"), x.meta.get("val")  # later matches read shapes
    norm.replace_all_uses_with(out)
    if residual:
        x.replace_all_uses_with(hsum)
    erase_unused(gm, m.inner)
    notes = []
    if norm_users:
        notes.append(f"norm output also feeds {', '.join(sorted({fqn_of(u) or u.name for u in norm_users}))} "
                     f"in float: quant fused, float copy kept")
    if sum_users:
        notes.append("residual sum also feeds the next residual: sum emitted by the same kernel")
    return Fused(fused, op_name(fused), "; ".join(notes))


def _act_quant(gm: fx.GraphModule, m: Match) -> Fused:
    """act(x) [* gate] -> quantize_per_token becomes act_quant(x, None, gate, act, emit_out)."""
    quant, prod, x, gate = m.root, m["prod"], m["x"], m.get("gate")
    act, users = act_of(m.get("act", prod)), _others(prod, quant)
    with gm.graph.inserting_after(last_of([x, gate])):
        fused = gm.graph.call_function(FUSED[quant.target][1], (x, None, gate, act, bool(users)))
    copy_meta(fused, prod)
    _, _, out = _rewire(gm, quant, fused, 3)
    out.meta["val"] = prod.meta.get("val")
    prod.replace_all_uses_with(out)
    erase_unused(gm, m.inner)
    return Fused(fused, op_name(fused), "activation output also has float consumers: float copy kept" if users else "")


def _quant_of(x) -> str:
    what = f"{x.op} {getattr(x.target, '__name__', x.target)}" if isinstance(x, fx.Node) else "?"
    return f"quantize_per_token of {what}"  # FP8 too: the record's op says which


RULES = [  # at each zq.quantize_per_token, the first that matches
    Rule(quant(layer_norm(RESIDUAL)), _norm_quant, "add+layernorm+quant"),
    Rule(quant(layer_norm(X)), _norm_quant, "layernorm+quant"),
    Rule(quant(rms_norm(RESIDUAL)), _norm_quant, "add+rmsnorm+quant"),
    Rule(quant(rms_norm(X)), _norm_quant, "rmsnorm+quant"),
    Rule(quant(gelu(X, "none")), _act_quant, "gelu+quant"),
    Rule(quant(gelu(X, "tanh")), _act_quant, "gelu_tanh+quant"),
    Rule(quant(P(aten.relu.default, X, name="prod")), _act_quant, "relu+quant"),
    Rule(quant(P(aten.silu.default, X, name="prod")), _act_quant, "silu+quant"),
    Rule(quant(gated(P(aten.silu.default, P.any("gate"), name="act"))), _act_quant, "silu+quant"),
    Rule(quant(gated(gelu(P.any("gate"), "tanh", name="act"))), _act_quant, "gelu_tanh+quant"),
    Rule(quant(gated(gelu(P.any("gate"), "none", name="act"))), _act_quant, "gelu+quant"),
    Rule.refuse(quant(X), _quant_of, "no fused kernel for this producer: quantization runs as its own kernel"),
]
PER_TENSOR = [Rule.refuse(P(zq.quantize_per_tensor.default), "quantize_per_tensor",
                          "static per-tensor quantization (the PTQ baseline) runs as its own kernel")]


ROW_VIEW = P(tuple(FUSED), P((aten.view.default, aten.reshape.default), P.node("src"), P.any("shape"),
                                               name="view", where=lambda view, src: _keeps_rows(view, src)))


def _keeps_rows(view: fx.Node, src: fx.Node) -> bool:
    a, b = shape_of(view), shape_of(src)
    return bool(a) and bool(b) and a[-1] == b[-1]


def _quant_before_view(gm: fx.GraphModule, m: Match) -> fx.Node:
    """quantize_per_token(view(src, [..., K])) -> view(q, [..., K]), view(scale, [..., 1]) of
    quantize_per_token(src)."""
    quant, view, src, shape = m.root, m["view"], m["src"], list(m["shape"])
    g = gm.graph
    with g.inserting_after(src):
        new = g.call_function(quant.target, (src,))
    copy_meta(new, quant)
    q, scale = getitems(gm, new, 2)
    with g.inserting_after(scale):
        views = [g.call_function(aten.reshape.default, (q, shape)),
                 g.call_function(aten.reshape.default, (scale, shape[:-1] + [1]))]
    for user in list(quant.users):  # getitem(quant, 0 | 1)
        copy_meta(views[user.args[1]], user)
        views[user.args[1]].meta["val"] = user.meta.get("val")
        user.replace_all_uses_with(views[user.args[1]])
        g.erase_node(user)
    g.erase_node(quant)
    if not view.users:  # else its float consumers (Mixtral's router) keep reading it
        g.erase_node(view)
    return new


def _hoist_over_row_views(gm: fx.GraphModule) -> int:
    hoisted = 0
    for node in calls(gm, *FUSED):
        while (m := match(ROW_VIEW, node)) is not None:
            node = _quant_before_view(gm, m)
            hoisted += 1
    return hoisted


def fuse_producer_quant(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    hoisted = _hoist_over_row_views(gm)
    done = rewrite(gm, ctx, RULES, calls(gm, *FUSED))
    rewrite(gm, ctx, PER_TENSOR, calls(gm, zq.quantize_per_tensor.default))  # reported, not counted
    gm.graph.lint()
    notes = [f"{hoisted} quantization(s) moved before a row-preserving view"] if hoisted else []
    return PassResult(gm, done.rewritten > 0 or hoisted > 0, done.matched, done.rewritten, notes)
