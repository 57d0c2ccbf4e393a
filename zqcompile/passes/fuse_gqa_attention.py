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

from zqcompile.passes.base import PassContext, PassResult, aten, calls, copy_meta, dtype_of, shape_of, zq
from zqcompile.passes.match import Fused, Match, P, Rule, rewrite, substitute


def repeated(name: str) -> P:
    """`name`, captured as `name`0 too when it is repeat_kv(k) = reshape(expand(unsqueeze(k, 2), ...), ...)."""
    repeat_kv = P(aten.expand.default, P(aten.unsqueeze.default, P.any(name + "0"), 2))
    return P((aten.reshape.default, aten.view.default), repeat_kv, name=name) | P.any(name)


SDPA = P(aten.scaled_dot_product_attention.default, P.any("q"), repeated("k"), repeated("v"), attn_mask=P.any("mask"),
         dropout_p=P.any("dropout"), is_causal=P.any("causal"), scale=P.any("scale"), enable_gqa=P.any("enable_gqa"))


def _bool_mask(mask) -> bool:
    ms = shape_of(mask) if isinstance(mask, fx.Node) else None
    return ms is not None and len(ms) == 4 and ms[1] == 1 and dtype_of(mask) == torch.bool


def _gqa_attention(gm: fx.GraphModule, m: Match) -> Fused:
    sdpa, q, k, v = m.root, m["q"], m.get("k0", m["k"]), m.get("v0", m["v"])
    hq, hk, hv = (shape_of(t)[1] for t in (q, k, v))
    if hk != hv or hq % hk:  # not a whole number of query heads per KV head: keep the repeated copies
        k, v = m["k"], m["v"]
    scale = 1.0 / math.sqrt(shape_of(q)[-1]) if m["scale"] is None else m["scale"]
    with gm.graph.inserting_before(sdpa):
        node = gm.graph.call_function(zq.gqa_attention.default, (q, k, v, m["mask"], float(scale)))
    copy_meta(node, sdpa)
    substitute(gm, sdpa, node)
    groups = shape_of(q)[1] // shape_of(k)[1]
    return Fused(node, "zq.gqa_attention", f"{groups} query heads per KV head, no repeat_kv copy", [sdpa.name])


RULES = [
    Rule(SDPA, _gqa_attention, "gqa-attention", candidate="gqa_attention", unless=(
        (lambda dropout, causal, enable_gqa: bool(dropout or causal or enable_gqa),
         "dropout, is_causal or enable_gqa set: SDPA kept"),
        (lambda mask: not _bool_mask(mask), "mask is not a boolean [B, 1, S, L] tensor: SDPA kept"))),
]


def fuse_gqa_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    done = rewrite(gm, ctx, RULES, calls(gm, aten.scaled_dot_product_attention.default))
    gm.graph.eliminate_dead_code()
    return PassResult(gm, bool(done.rewritten), done.matched, done.rewritten,
                      [f"{done.rewritten} of {done.matched} SDPA -> zq.gqa_attention"])
