"""concat_sibling_gemms: GEMMs that read the same input with the same plan become one GEMM over their
concatenated weights (q/k/v projections; LLaMA's gate/up), so the input is quantized and read once and one
larger GEMM replaces several small launches.

Matches: >= 2 `aten.linear` with constant weights, one input node, equal role and scheme (roles qkv, fc1).
Emits: one `aten.linear(x, cat(W), cat(b))` and `aten.split_with_sizes` feeding the old consumers. Per-row
and K-group weight scales are unchanged by stacking rows; row-group schemes (num_groups) are left alone.
A float GEMM gets its concatenated weight as a constant; a quantized one gets an `aten.cat` node over the
parts, which `group_wise_weight` quantizes one GEMM at a time, so the float copies of every merged weight never
exist together (at the Llama-3-8B shape they were 9 GB, most of the compile's peak above the model).
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch import fx

from zqcompile.passes.base import FusionRecord, GemmInfo, PassContext, PassResult, add_constant, aten, calls, copy_meta, get_tensor

_ROLES = ("qkv", "fc1")


def _mergeable(info: GemmInfo | None) -> bool:
    if info is None or info.role not in _ROLES:
        return False
    w = info.scheme.weight
    return w is None or w.granularity != "row_groups" or w.num_groups is None


def merged_name(fqns: list[str]) -> str:
    """'self_attn.q_proj+k_proj+v_proj': the GEMMs' common module path, then what differs ('mlp.experts.0.gate_up_proj
    +1.gate_up_proj' for experts' slices)."""
    parts = [f.split(".") for f in fqns]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    prefix = ".".join(parts[0][:common])
    return (prefix + "." if prefix else "") + "+".join(".".join(p[common:]) for p in parts)


def concatenated(*weights: torch.Tensor) -> torch.Tensor:
    return torch.cat(weights).contiguous()


def concatenated_biases(has_bias: tuple[bool, ...], *parts: torch.Tensor) -> torch.Tensor:
    """The biases stacked like their weights; parts[i] is GEMM i's bias, or its weight where it has none."""
    return torch.cat([p if b else p.new_zeros(p.shape[0]) for b, p in zip(has_bias, parts)]).contiguous()


def _merge(gm: fx.GraphModule, ctx: PassContext, group: list[fx.Node]) -> None:
    g = gm.graph
    weights = [get_tensor(gm, n.args[1]) for n in group]
    biases = [get_tensor(gm, n.args[2]) if len(n.args) > 2 and n.args[2] is not None else None for n in group]
    infos = [n.meta["zq_gemm"] for n in group]
    fqn = merged_name([i.fqn for i in infos])
    first = min(group, key=lambda n: list(g.nodes).index(n))
    if infos[0].scheme.is_float:
        w_cat = ctx.constants.derive(concatenated, *weights)
        w_node = add_constant(gm, fqn + ".weight", w_cat, before=first)
    else:
        for n in group:  # a scaled weight's get_attr sits by its own GEMM; get_attrs read nothing, so move them up
            first.prepend(n.args[1])
        with g.inserting_before(first):
            w_node = g.call_function(aten.cat.default, ([n.args[1] for n in group],))
    b_node = None
    if any(b is not None for b in biases):
        # a GEMM without a bias adds zero rows, made like its weight (dtype, device: a placeholder stays one)
        has_bias = tuple(b is not None for b in biases)
        b_cat = ctx.constants.derive(concatenated_biases, has_bias,
                                     *(b if b is not None else w for b, w in zip(biases, weights)))
        b_node = add_constant(gm, fqn + ".bias", b_cat, before=first)
    with g.inserting_before(first):
        lin = g.call_function(aten.linear.default, (group[0].args[0], w_node, b_node))
        sizes = [w.shape[0] for w in weights]
        split = g.call_function(aten.split_with_sizes.default, (lin, sizes, -1))
    copy_meta(lin, first)
    merged = GemmInfo(fqn, infos[0].role, infos[0].scheme, infos[0].rule,
                      (sum(sizes), weights[0].shape[1]), parts=sum((i.parts for i in infos), ()))
    lin.meta["zq_gemm"] = merged
    with g.inserting_before(first):
        parts = [g.call_function(operator.getitem, (split, i)) for i in range(len(group))]
    for node, part in zip(group, parts):
        part.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(part)
        g.erase_node(node)
    ctx.gemms[:] = [x for x in ctx.gemms if x not in infos]
    ctx.gemms.append(merged)
    ctx.fusions.append(FusionRecord(f"concat:{infos[0].role}", fqn, [i.fqn for i in infos], "aten.linear (one GEMM)",
                                    f"{len(group)} GEMMs on one input -> one GEMM of N={sum(sizes)}"))


def concat_sibling_gemms(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if not ctx.config.merge_gemms:
        return PassResult(gm, False, 0, 0, ["disabled by config.merge_gemms"])
    groups: dict[tuple, list[fx.Node]] = defaultdict(list)
    for node in calls(gm, aten.linear.default):
        info = node.meta.get("zq_gemm")
        if _mergeable(info) and get_tensor(gm, node.args[1]) is not None:
            groups[(node.args[0], info.role, info.scheme)].append(node)
    merged = 0
    for nodes in groups.values():
        if len(nodes) >= 2:
            _merge(gm, ctx, nodes)
            merged += 1
    gm.graph.lint()
    return PassResult(gm, merged > 0, sum(len(v) for v in groups.values()), merged, [f"{merged} GEMM groups merged"])
