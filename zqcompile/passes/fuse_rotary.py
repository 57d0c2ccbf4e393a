"""fuse_rotary (generation graphs): the rotate-half rotary embedding Hugging Face applies to the query and
key heads of LLaMA-style attention, `x * cos + cat(-x[..., D/2:], x[..., :D/2]) * sin`, is a dozen small
elementwise kernels per layer (mul, slice, neg, cat, mul, add, twice). Replaced by one `zq.rope(q, k, cos,
sin)` per layer: one kernel for both heads' sets, contiguous outputs.

Matches: add(mul(x, cos), mul(cat([neg(slice(x, -1, D/2, end)), slice(x, -1, 0, D/2)], -1), sin)) with
cos / sin [B, 1, S, D] in x's dtype, two of them (query, key) sharing cos and sin. Emits: zq.rope.
"""
from __future__ import annotations

from collections import defaultdict

from torch import fx

from zqcompile.passes.base import (FusionRecord, NotFused, PassContext, PassResult, arg, aten, copy_meta, dtype_of,
                                   fqn_of, getitems, shape_of, zq)
from zqcompile.passes.match import P, match

_LAST = (-1, 3)
_END = 2**62


def _is_half(s: fx.Node, start: int, end: int | None) -> bool:
    """s == x[..., start:end] (end None: to the end)."""
    e = arg(s, "end")
    if arg(s, "dim") not in _LAST or (arg(s, "start") or 0) != start:
        return False
    return e is None or e >= _END if end is None else e == end


def _halves(x: fx.Node, hi: fx.Node, lo: fx.Node) -> bool:
    d = (shape_of(x) or (None,))[-1]
    return isinstance(d, int) and not d % 2 and _is_half(lo, 0, d // 2) and _is_half(hi, d // 2, None)


def _tables(x: fx.Node, cos, sin) -> bool:
    """cos / sin are [B, 1, S, D] tensors in x's dtype, x is [B, H, S, D]."""
    shape, xs = shape_of(cos), shape_of(x)
    return (isinstance(cos, fx.Node) and isinstance(sin, fx.Node) and bool(shape) and bool(xs) and len(shape) == 4
            and len(xs) == 4 and shape[1] == 1 and shape_of(sin) == shape
            and dtype_of(cos) == dtype_of(sin) == dtype_of(x))


X = P.node("x")
# cat([-x[..., D/2:], x[..., :D/2]], -1)
HI, LO = P(aten.slice.Tensor, X, name="hi"), P(aten.slice.Tensor, X, name="lo")
ROTATE_HALF = P(aten.cat.default, [P(aten.neg.default, HI), LO], P.any("dim"),
                where=lambda x, hi, lo, dim: dim in _LAST and _halves(x, hi, lo))
ROTARY = P(aten.add.Tensor, P(aten.mul.Tensor, X, P.any("cos"), commute=True),
           P(aten.mul.Tensor, ROTATE_HALF, P.any("sin"), commute=True), commute=True, where=_tables)


def fuse_rotary(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    groups: dict[tuple, list[tuple[fx.Node, fx.Node]]] = defaultdict(list)
    for n in gm.graph.nodes:
        if (m := match(ROTARY, n)) is not None:
            groups[(m["cos"], m["sin"])].append((n, m["x"]))
    rewritten = 0
    for (cos, sin), pairs in groups.items():
        if len(pairs) != 2:
            for add, _ in pairs:
                ctx.not_fused.append(NotFused("rope", fqn_of(add), f"{len(pairs)} rotary embeddings share cos/sin "
                                              "(zq.rope takes a query and a key): left as elementwise ops"))
            continue
        (q_add, q), (k_add, k) = sorted(pairs, key=lambda p: p[0])  # in graph order: the query's comes first
        if max(q, k, cos, sin) > q_add:
            ctx.not_fused.append(NotFused("rope", fqn_of(q_add), "key heads computed after the query's rotary "
                                          "embedding: left as elementwise ops"))
            continue
        with gm.graph.inserting_before(q_add):
            node = gm.graph.call_function(zq.rope.default, (q, k, cos, sin))
        copy_meta(node, q_add)
        q_out, k_out = getitems(gm, node, 2)
        q_add.replace_all_uses_with(q_out)
        k_add.replace_all_uses_with(k_out)
        ctx.fusions.append(FusionRecord("rope", fqn_of(q_add), [q_add.name, k_add.name], "zq.rope",
                                        "rotate-half rotary embedding of q and k in one op"))
        rewritten += 1
    gm.graph.eliminate_dead_code()
    matched = sum(len(p) for p in groups.values())
    return PassResult(gm, bool(rewritten), matched, rewritten, [f"{rewritten} q/k rotary pairs -> zq.rope"])
