"""fuse_gqa_attention (generation graphs): Hugging Face feeds grouped-query attention to SDPA after
`repeat_kv`, which copies every KV head Hq / Hkv times: in decode that is two copies of the whole cache per
layer per token. Replaced by `zq.gqa_attention(q, k, v, mask, scale)` on the un-repeated cache, whose CUDA
kernel (one query token per row) reads each KV head in place; plain multi-head attention (GPT-2, OPT) maps
to it too, with one group.

Matches: aten.scaled_dot_product_attention(q, k', v', bool mask [B, 1, S, L]) without dropout or is_causal,
where k' / v' are k / v or reshape(expand(unsqueeze(k, 2))) (repeat_kv). Emits: zq.gqa_attention.
"""
from __future__ import annotations

import math

import torch
from torch import fx

from zqcompile.passes.base import FusionRecord, NotFused, PassContext, PassResult, aten, copy_meta, dtype_of, fqn_of, is_call, \
    shape_of, zq


def _unrepeat(node):
    """k when node == repeat_kv(k) = reshape(expand(unsqueeze(k, 2), ...), ...); node itself otherwise."""
    if is_call(node, aten.reshape.default, aten.view.default):
        ex = node.args[0]
        if is_call(ex, aten.expand.default) and is_call(ex.args[0], aten.unsqueeze.default) \
                and ex.args[0].args[1] == 2:
            return ex.args[0].args[0]
    return node


def _sdpa_arg(node: fx.Node, i: int, name: str, default):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def fuse_gqa_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    matched = rewritten = 0
    for n in list(gm.graph.nodes):
        if not is_call(n, aten.scaled_dot_product_attention.default):
            continue
        matched += 1
        q, k, v = n.args[:3]
        mask = _sdpa_arg(n, 3, "attn_mask", None)
        dropout, causal = _sdpa_arg(n, 4, "dropout_p", 0.0), _sdpa_arg(n, 5, "is_causal", False)
        scale = _sdpa_arg(n, 6, "scale", None)
        ms = shape_of(mask) if isinstance(mask, fx.Node) else None
        why = None
        if dropout or causal or _sdpa_arg(n, 7, "enable_gqa", False):
            why = "dropout, is_causal or enable_gqa set"
        elif ms is None or len(ms) != 4 or ms[1] != 1 or dtype_of(mask) != torch.bool:
            why = "mask is not a boolean [B, 1, S, L] tensor"
        if why:
            ctx.not_fused.append(NotFused("gqa_attention", fqn_of(n), why + ": SDPA kept"))
            continue
        k0, v0 = _unrepeat(k), _unrepeat(v)
        hq, hk, hv = (shape_of(t)[1] for t in (q, k0, v0))
        if hk != hv or hq % hk:
            k0, v0 = k, v
        if scale is None:
            scale = 1.0 / math.sqrt(shape_of(q)[-1])
        with gm.graph.inserting_before(n):
            node = gm.graph.call_function(zq.gqa_attention.default, (q, k0, v0, mask, float(scale)))
        copy_meta(node, n)
        n.replace_all_uses_with(node)
        gm.graph.erase_node(n)
        groups = shape_of(q)[1] // shape_of(k0)[1]
        ctx.fusions.append(FusionRecord("gqa-attention", fqn_of(node), [n.name], "zq.gqa_attention",
                                        f"{groups} query heads per KV head, no repeat_kv copy"))
        rewritten += 1
    gm.graph.eliminate_dead_code()
    return PassResult(gm, bool(rewritten), matched, rewritten, [f"{rewritten} of {matched} SDPA -> zq.gqa_attention"])
