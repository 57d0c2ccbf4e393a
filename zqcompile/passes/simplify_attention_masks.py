"""simplify_attention_masks: an attention mask computed from tensor *shapes* only (Hugging Face builds one
even when the caller passes no attention_mask) is a constant pattern: all-visible or causal. Passing it to
`scaled_dot_product_attention` as a tensor pushes the GPU onto the slow "math" attention kernel (measured on
an H200: 11.5 ms of a BERT-base batch-128 forward, against 1.7 ms for the fused kernel eager uses).

Matches: `aten.scaled_dot_product_attention(q, k, v, mask)` whose mask depends on no input data (the graph
inputs reach it only through their sizes). The mask is evaluated at two shapes; all-visible -> no mask,
causal -> `is_causal=True`; anything else is left alone. A mask built from a real attention_mask input is
data, so it is never touched.
"""
from __future__ import annotations

import torch
from torch import fx

from .base import PassContext, PassResult, aten, calls

_SIZE_OPS = (aten.sym_size.int,)
_PROBE_SHAPES = ((2, 5), (3, 9))


def _mask_arg(node: fx.Node):
    if len(node.args) > 3:
        return node.args[3]
    return node.kwargs.get("attn_mask")


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]  # graph (topological) order


def _shape_only(nodes: list[fx.Node]) -> bool:
    keep = set(nodes)
    for n in nodes:
        if n.op == "placeholder" and any(u in keep and not (u.op == "call_function" and u.target in _SIZE_OPS)
                                         for u in n.users):
            return False
        if n.op == "call_module":
            return False
    return True


def _evaluator(gm: fx.GraphModule, nodes: list[fx.Node], mask: fx.Node) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for p in gm.graph.nodes:  # every placeholder, in order, so the probe takes the graph's inputs
        if p.op == "placeholder":
            env[p] = g.placeholder(p.name)
    for n in nodes:
        if n.op != "placeholder":
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[mask])
    return fx.GraphModule(gm, g)


def _classify(values: list[tuple[torch.Tensor, int]]) -> str | None:
    kinds = set()
    for m, s in values:
        m = m.detach().cpu()
        visible = m if m.dtype == torch.bool else (m == 0)
        if m.dtype != torch.bool and not bool(((m == 0) | torch.isinf(m) | (m <= torch.finfo(m.dtype).min)).all()):
            return None
        visible = visible.expand(*visible.shape[:-2], s, s)
        if bool(visible.all()):
            kinds.add("none")
        elif torch.equal(visible, torch.ones(s, s, dtype=torch.bool).tril().expand_as(visible)):
            kinds.add("causal")
        else:
            return None
    return kinds.pop() if len(kinds) == 1 else None


def simplify_attention_masks(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    sdpas = calls(gm, aten.scaled_dot_product_attention.default)
    cache: dict[fx.Node, str | None] = {}
    rewritten = 0
    examples = ctx.example_inputs
    for node in sdpas:
        mask = _mask_arg(node)
        if not isinstance(mask, fx.Node) or node.kwargs.get("is_causal") or (len(node.args) > 5 and node.args[5]):
            continue
        if mask not in cache:
            nodes = _ancestors(mask)
            kind = None
            if _shape_only(nodes) and all(t.dim() >= 2 for t in examples):
                probe = _evaluator(gm, nodes, mask)
                values = []
                for b, s in _PROBE_SHAPES:
                    inputs = [torch.zeros((b, s, *t.shape[2:]), dtype=t.dtype, device=t.device) for t in examples]
                    with torch.no_grad():
                        values.append((probe(*inputs), s))
                kind = _classify(values)
            cache[mask] = kind
        kind = cache[mask]
        if kind is None:
            continue
        kwargs = {k: v for k, v in node.kwargs.items() if k != "attn_mask"}
        names = ["dropout_p", "is_causal", "scale", "enable_gqa"]
        for name, value in zip(names, node.args[4:]):
            kwargs[name] = value
        kwargs["is_causal"] = kind == "causal"
        node.args = tuple(node.args[:3])
        node.kwargs = kwargs
        rewritten += 1
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    kinds = sorted({k for k in cache.values() if k})
    return PassResult(gm, rewritten > 0, len(sdpas), rewritten,
                      [f"{rewritten} shape-only masks -> {', '.join(kinds) or 'none'}"])
