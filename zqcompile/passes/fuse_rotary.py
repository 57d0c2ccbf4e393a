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

from zqcompile.passes.base import FusionRecord, NotFused, PassContext, PassResult, aten, copy_meta, dtype_of, fqn_of, getitems, \
    is_call, shape_of, zq

_LAST = (-1, 3)
_END = 2**62


def _slice_of(node, x: fx.Node, start: int, end: int | None) -> bool:
    """node == x[..., start:end] (end None: to the end)."""
    if not is_call(node, aten.slice.Tensor) or node.args[0] is not x:
        return False
    dim, s, e = (list(node.args[1:4]) + [0, None, None])[:3]
    if dim not in _LAST or (s or 0) != start:
        return False
    return e is None or e >= _END if end is None else e == end


def _rotate_half_of(node) -> fx.Node | None:
    """x when node == cat([-x[..., D/2:], x[..., :D/2]], -1)."""
    if not is_call(node, aten.cat.default) or len(node.args[0]) != 2:
        return None
    if (node.args[1] if len(node.args) > 1 else 0) not in _LAST:
        return None
    neg, low = node.args[0]
    if not is_call(neg, aten.neg.default) or not is_call(low, aten.slice.Tensor):
        return None
    x = low.args[0]
    d = (shape_of(x) or (None,))[-1]
    if not isinstance(d, int) or d % 2:
        return None
    return x if _slice_of(low, x, 0, d // 2) and _slice_of(neg.args[0], x, d // 2, None) else None


def _match(add: fx.Node):
    """(x, cos, sin) of one rotary embedding ending at `add`, or None."""
    if not is_call(add, aten.add.Tensor) or len(add.args) != 2:
        return None
    for m_cos, m_sin in (add.args, add.args[::-1]):
        if not (is_call(m_cos, aten.mul.Tensor) and is_call(m_sin, aten.mul.Tensor)):
            continue
        for rot, sin in (m_sin.args, m_sin.args[::-1]):
            x = _rotate_half_of(rot)
            if x is None or x not in m_cos.args:
                continue
            cos = m_cos.args[1] if m_cos.args[0] is x else m_cos.args[0]
            shape, xs = shape_of(cos), shape_of(x)
            if (isinstance(cos, fx.Node) and isinstance(sin, fx.Node) and shape and xs and len(shape) == 4
                    and len(xs) == 4 and shape[1] == 1 and shape_of(sin) == shape
                    and dtype_of(cos) == dtype_of(sin) == dtype_of(x)):
                return x, cos, sin
    return None


def fuse_rotary(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    groups: dict[tuple, list[tuple[fx.Node, fx.Node]]] = defaultdict(list)
    for n in gm.graph.nodes:
        m = _match(n)
        if m is not None:
            groups[(m[1], m[2])].append((n, m[0]))
    rewritten = 0
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for (cos, sin), pairs in groups.items():
        if len(pairs) != 2:
            for add, _ in pairs:
                ctx.not_fused.append(NotFused("rope", fqn_of(add), f"{len(pairs)} rotary embeddings share cos/sin "
                                              "(zq.rope takes a query and a key): left as elementwise ops"))
            continue
        (q_add, q), (k_add, k) = sorted(pairs, key=lambda p: order[p[0]])
        if max(order[q], order[k], order[cos], order[sin]) > order[q_add]:
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
