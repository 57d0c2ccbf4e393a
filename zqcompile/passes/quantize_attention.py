"""quantize_attention (ZeroQuant-HERO's quantized attention, QuantConfig.attention): the attention products
Q.K^T and P.V on 8-bit codes. Every softmax attention of the graph -- SDPA in the engine graph, zq.gqa_attention
over the KV cache in the generation graphs -- becomes `zq.quant_attention(q, k, v, mask, scale, is_causal, fp8,
per_token, pv_fp8)`: Q, K, V with dynamic scales per head (or per token / channel), P per query row
(ops/quant_math.quant_attention).
Off when the config has no `attention`.

Matches: aten.scaled_dot_product_attention(q, k, v, mask?, dropout 0, is_causal?, scale?, enable_gqa?) and
zq.gqa_attention(q, k, v, mask, scale). Emits: zq.quant_attention. SDPA with dropout is kept, with a note.
"""
from __future__ import annotations

import math

from torch import fx

from zqcompile.config import AttentionQuant
from zqcompile.passes.base import NotFused, PassContext, PassResult, aten, calls, copy_meta, shape_of, warn_at_caller
from zqcompile.passes.base import zq
from zqcompile.passes.match import Fused, Match, P, Rule, rewrite, substitute

SDPA = P(aten.scaled_dot_product_attention.default, P.any("q"), P.any("k"), P.any("v"), attn_mask=P.any("mask"),
         dropout_p=P.any("dropout"), is_causal=P.any("causal"), scale=P.any("scale"), enable_gqa=P.any("enable_gqa"))
GQA = P(zq.gqa_attention.default, P.any("q"), P.any("k"), P.any("v"), P.any("mask"), P.any("scale"))


def _emit(gm: fx.GraphModule, node: fx.Node, q, k, v, mask, scale, causal: bool, attn: AttentionQuant,
          was: str) -> Fused:
    scale = 1.0 / math.sqrt(shape_of(q)[-1]) if scale is None else float(scale)
    fp8, pv_fp8, per_token = attn.dtype == "fp8", attn.dtype != "int8", attn.granularity == "token"
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(zq.quant_attention.default,
                                     (q, k, v, mask, scale, bool(causal), fp8, per_token, pv_fp8))
    copy_meta(new, node)
    substitute(gm, node, new)
    codes = {False: "INT8", True: "FP8 E4M3"}
    scales = "per-token Q / K and per-channel V" if per_token else "per-head Q / K / V"
    return Fused(new, "zq.quant_attention", f"{was}: Q.K^T on {codes[fp8]} codes, P.V on {codes[pv_fp8]}, "
                                            f"{scales} scales, per-row P scales", [node.name])


def _rules(attn: AttentionQuant) -> list[Rule]:
    def sdpa(gm: fx.GraphModule, m: Match) -> Fused:
        return _emit(gm, m.root, m["q"], m["k"], m["v"], m["mask"], m["scale"], m["causal"], attn, "SDPA")

    def gqa(gm: fx.GraphModule, m: Match) -> Fused:
        return _emit(gm, m.root, m["q"], m["k"], m["v"], m["mask"], m["scale"], False, attn, "KV-cache attention")

    return [Rule(SDPA, sdpa, "quant-attention", candidate="quant_attention", unless=(
                (lambda dropout: bool(dropout), "dropout set: SDPA kept"),
                (lambda q, k: shape_of(q) is None or shape_of(k) is None
                 or shape_of(q)[1] % shape_of(k)[1] != 0, "query heads not a multiple of KV heads: SDPA kept"))),
            Rule(GQA, gqa, "quant-attention", candidate="quant_attention")]


def quantize_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    attn = ctx.config.attention
    if attn is None:
        return PassResult(gm, False, 0, 0, ["off (QuantConfig.attention is None)"])
    anchors = calls(gm, aten.scaled_dot_product_attention.default, zq.gqa_attention.default)
    done = rewrite(gm, ctx, _rules(attn), anchors)
    gm.graph.eliminate_dead_code()
    if not anchors:  # eager attention (matmul + softmax): nothing to quantize, and the user asked for it
        why = ("the graph has no SDPA call (the model's attention runs as matmul + softmax): the attention stays "
               "float; load the model with attn_implementation='sdpa'")
        ctx.not_fused.append(NotFused("quant_attention", "(model)", why))
        if ctx.warn:
            warn_at_caller(f"QuantConfig.attention: {why}")
    return PassResult(gm, bool(done.rewritten), done.matched, done.rewritten,
                      [f"{done.rewritten} of {done.matched} attentions -> zq.quant_attention ({attn.dtype}, "
                       f"{attn.granularity} scales)"])

