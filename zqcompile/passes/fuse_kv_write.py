"""fuse_kv_write (generation graphs, after fuse_rotary): each attention layer still writes its new key and value
rows into the static KV cache with two `index_copy_` kernels (zqcompile/generation/kv_cache.py), the key rows
being zq.rope's second output. Replaced by one `zq.rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, slots)`
a layer: the rotary embedding and both cache writes in one op (one kernel on CUDA).

Matches: r = zq.rope(q, k, cos, sin) whose key output feeds only index_copy_(kc, 2, slots, r[1]), followed,
with only views in between, by the value write index_copy_(vc, 2, slots, v) (same slots, vc shaped like kc, v
like the keys), neither write's result used. Emits: zq.rope_kv_write in place of the value write (every input
is defined by then, and the rotated q is read only after it); zq.rope and both writes go. A quantized (int8)
cache writes codes and scales instead: its layers keep their ops.
"""
from __future__ import annotations

import operator

from torch import fx

from zqcompile.passes.base import FusionRecord, NotFused, PassContext, PassResult, aten, calls, copy_meta, fqn_of
from zqcompile.passes.base import shape_of, zq

_VIEWS = (aten.slice.Tensor, aten.view.default, aten.reshape.default, aten.select.int)


def _outputs(rope: fx.Node) -> dict[int, fx.Node]:
    return {u.args[1]: u for u in rope.users if u.target is operator.getitem}


def _write(node: fx.Node, slots=None) -> bool:
    """node is index_copy_(cache, 2, slots, src) (with these slots when given) whose result nobody reads."""
    return (node.op == "call_function" and node.target is aten.index_copy_.default and len(node.args) == 4
            and node.args[1] in (2, -2) and (slots is None or node.args[2] is slots) and not node.users)


def _value_write(k_write: fx.Node) -> fx.Node | str:
    """The value write after the key write, or why there is none."""
    kc, _, slots, k_rot = k_write.args
    n = k_write.next
    while n.op == "call_function" and n.target in _VIEWS:
        n = n.next
    if not _write(n, slots):
        return "no value-cache write with the same slots right after the key write"
    vc, _, _, v = n.args
    if shape_of(vc) != shape_of(kc) or shape_of(v) != shape_of(k_rot):
        return "the value write's shapes differ from the key write's"
    return n


def _why_not(rope: fx.Node) -> str | fx.Node:
    outs = _outputs(rope)
    if set(outs) != {0, 1} or len(rope.users) != 2:
        return "zq.rope's outputs are not one query and one key output"
    k_users = list(outs[1].users)
    if any(u.target is zq.quantize_per_token.default for u in k_users):
        return "an int8 KV cache (codes and scales written by their own ops)"
    if len(k_users) != 1 or not _write(k_users[0]) or k_users[0].args[3] is not outs[1]:
        return "the rotated keys are read by more than their cache write (or written with a dtype cast)"
    v_write = _value_write(k_users[0])
    if isinstance(v_write, str):
        return v_write
    if any(u < v_write for u in outs[0].users):
        return "the rotated queries are read before the value write"
    return v_write


def fuse_kv_write(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    ropes = calls(gm, zq.rope.default)
    rewritten = 0
    for rope in ropes:
        found = _why_not(rope)
        if isinstance(found, str):
            ctx.not_fused.append(NotFused("rope-kv-write", fqn_of(rope), f"{found}: zq.rope and index_copy_ kept"))
            continue
        v_write, outs = found, _outputs(rope)
        k_write = next(iter(outs[1].users))
        q, k, cos, sin = rope.args
        kc, _, slots, _ = k_write.args
        vc, _, _, v = v_write.args
        with gm.graph.inserting_before(v_write):
            node = gm.graph.call_function(zq.rope_kv_write.default, (q, k, v, cos, sin, kc, vc, slots))
        copy_meta(node, outs[0])
        outs[0].replace_all_uses_with(node)
        for dead in (v_write, k_write, outs[1], outs[0], rope):
            gm.graph.erase_node(dead)
        ctx.fusions.append(FusionRecord("rope-kv-write", fqn_of(node), [rope.name, k_write.name, v_write.name],
                                        "zq.rope_kv_write", "rotary embedding of q and k and the KV-cache write of "
                                        "k and v in one op"))
        rewritten += 1
    return PassResult(gm, bool(rewritten), len(ropes), rewritten,
                      [f"{rewritten} of {len(ropes)} rotary + KV-cache writes -> zq.rope_kv_write"])
