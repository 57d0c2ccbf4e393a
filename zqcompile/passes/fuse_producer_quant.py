"""fuse_producer_quant: fuse token-wise quantization into the op that produces the activation (ZeroQuant
Sec. 4.3), so one kernel reads the float input and writes int8 + per-token scales.

Matches `zq.quantize_per_token(p)` where p is: `layer_norm` / `rms_norm` (with a residual `add` in front of
it when there is one), `gelu`, `relu`, or `mul(silu(gate), up)`. Emits `zq.norm_quant` / `zq.act_quant`; the
float output (and the residual sum) are emitted only when another consumer still needs them.
"""
from __future__ import annotations

from torch import fx

from zqcompile.passes.base import (ACTIVATION_OPS, FusionRecord, NotFused, PassContext, PassResult, act_of, aten, calls, copy_meta,
                   fqn_of, getitems, is_call, shape_of, zq)

NORMS = {aten.layer_norm.default: "layer", aten.rms_norm.default: "rms"}


def _insert_after_inputs(gm: fx.GraphModule, inputs: list) -> fx.Node:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return max((a for a in inputs if isinstance(a, fx.Node)), key=order.__getitem__)


def _others(node: fx.Node, exclude: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u is not exclude]


def _rewire(gm: fx.GraphModule, quant: fx.Node, fused: fx.Node, n_out: int) -> list[fx.Node]:
    outs = getitems(gm, fused, n_out)
    for user in list(quant.users):  # getitem(quant, 0|1)
        outs[user.args[1]].meta["val"] = user.meta.get("val")
        user.replace_all_uses_with(outs[user.args[1]])
        gm.graph.erase_node(user)
    gm.graph.erase_node(quant)
    return outs


def _residual_add(node: fx.Node):
    if is_call(node, aten.add.Tensor) and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        if isinstance(a, fx.Node) and isinstance(b, fx.Node) and shape_of(a) == shape_of(b) and shape_of(a):
            return a, b
    return None


def _fuse_norm(gm: fx.GraphModule, ctx: PassContext, quant: fx.Node, norm: fx.Node) -> None:
    kind = NORMS[norm.target]
    if kind == "layer":
        x, _, weight, bias, eps = (list(norm.args) + [None, None, 1e-5])[:5]
    else:
        x, _, weight, eps = (list(norm.args) + [None, None])[:4]
        bias = None
    eps = 1e-5 if eps is None else eps
    norm_users = _others(norm, quant)
    add = _residual_add(x)
    add_users = _others(x, norm) if add else []
    args = (add[0], add[1]) if add else (x, None)
    inputs = [*args, weight, bias]
    with gm.graph.inserting_after(_insert_after_inputs(gm, inputs)):
        fused = gm.graph.call_function(zq.norm_quant.default,
                                       (*args, weight, bias, float(eps), kind, bool(norm_users), bool(add_users)))
    copy_meta(fused, norm)
    _, _, out, hsum = _rewire(gm, quant, fused, 4)
    out.meta["val"], hsum.meta["val"] = norm.meta.get("val"), x.meta.get("val")  # later matches read shapes
    norm.replace_all_uses_with(out)
    gm.graph.erase_node(norm)
    if add:
        x.replace_all_uses_with(hsum)
        gm.graph.erase_node(x)
    fqn = fqn_of(fused)
    replaced = (["aten.add"] if add else []) + [f"aten.{kind}_norm" if kind == "rms" else "aten.layer_norm",
                                                "zq.quantize_per_token"]
    notes = []
    if norm_users:
        notes.append(f"norm output also feeds {', '.join(sorted({fqn_of(u) or u.name for u in norm_users}))} "
                     f"in float: quant fused, float copy kept")
    if add_users:
        notes.append("residual sum also feeds the next residual: sum emitted by the same kernel")
    ctx.fusions.append(FusionRecord(("add+" if add else "") + f"{kind}norm+quant", fqn, replaced,
                                    "zq.norm_quant", "; ".join(notes)))


def _fuse_act(gm: fx.GraphModule, ctx: PassContext, quant: fx.Node, prod: fx.Node) -> None:
    if is_call(prod, aten.mul.Tensor):
        a, b = prod.args
        silu, up = (a, b) if is_call(a, aten.silu.default) else (b, a)
        x, gate, act, replaced = up, silu.args[0], "silu", ["aten.silu", "aten.mul", "zq.quantize_per_token"]
        dead = [prod, silu] if len(silu.users) == 1 else [prod]
    else:
        act = act_of(prod)
        x, gate, replaced, dead = prod.args[0], None, [f"aten.{ACTIVATION_OPS[prod.target]}", "zq.quantize_per_token"], [prod]
    users = _others(prod, quant)
    with gm.graph.inserting_after(_insert_after_inputs(gm, [x, gate])):
        fused = gm.graph.call_function(zq.act_quant.default, (x, None, gate, act, bool(users)))
    copy_meta(fused, prod)
    _, _, out = _rewire(gm, quant, fused, 3)
    out.meta["val"] = prod.meta.get("val")
    prod.replace_all_uses_with(out)
    for d in dead:
        if not d.users:
            gm.graph.erase_node(d)
    note = "activation output also has float consumers: float copy kept" if users else ""
    ctx.fusions.append(FusionRecord(f"{act}+quant", fqn_of(fused), replaced, "zq.act_quant", note))


def _is_silu_mul(node) -> bool:
    return is_call(node, aten.mul.Tensor) and len(node.args) == 2 and any(
        is_call(a, aten.silu.default) for a in node.args) and all(isinstance(a, fx.Node) for a in node.args) \
        and shape_of(node.args[0]) == shape_of(node.args[1])


def fuse_producer_quant(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    matched = rewritten = 0
    for quant in calls(gm, zq.quantize_per_token.default):
        matched += 1
        prod = quant.args[0]
        if is_call(prod, *NORMS):
            _fuse_norm(gm, ctx, quant, prod)
        elif is_call(prod, *ACTIVATION_OPS) or _is_silu_mul(prod):
            _fuse_act(gm, ctx, quant, prod)
        else:
            what = f"{prod.op} {getattr(prod.target, '__name__', prod.target)}" if isinstance(prod, fx.Node) else "?"
            ctx.not_fused.append(NotFused(f"quantize_per_token of {what}", fqn_of(quant),
                                          "no fused kernel for this producer: quantization runs as its own kernel"))
            continue
        rewritten += 1
    for quant in calls(gm, zq.quantize_per_tensor.default):
        ctx.not_fused.append(NotFused("quantize_per_tensor", fqn_of(quant),
                                      "static per-tensor quantization (the PTQ baseline) runs as its own kernel"))
    gm.graph.lint()
    return PassResult(gm, rewritten > 0, matched, rewritten)
