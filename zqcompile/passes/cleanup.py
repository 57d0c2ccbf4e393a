"""cleanup: remove dead nodes and the float weights nothing reads any more (they are replaced by quantized
constants), and flag any QDQ node left unfused so the report shows it (never a silent slow path).

Matches: dead nodes, unused get_attr constants, leftover `zq.dequantize_*`. Emits nothing new.
"""
from __future__ import annotations

import torch
from torch import fx

from zqcompile.passes.base import NotFused, PassContext, PassResult, calls, delete_attr, fqn_of, zq


def _why_unfused(n: fx.Node) -> str:
    codes = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
    if n.target == zq.dequantize_per_token.default and codes is not None and codes.dtype == torch.float8_e4m3fn \
            and all(u.target == zq.weight_only_gemm.default for u in n.users):
        return ("FP8 activations into INT8 weights: no GEMM multiplies FP8 by INT8, so the FP8-rounded activation is "
                "dequantized and the INT8-weight A16 GEMM (weight_only_gemm) reads it")
    return "consumer is not a GEMM the fusion knows: runs unfused (QDQ)"


def cleanup(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    g = gm.graph
    before = len(g.nodes)
    g.eliminate_dead_code()
    used = {n.target for n in g.nodes if n.op == "get_attr"}
    freed = 0
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in used and delete_attr(gm, name):
            freed += 1
    for n in calls(gm, zq.dequantize_per_token.default, zq.dequantize_weight.default):
        ctx.not_fused.append(NotFused(str(n.target.name()), fqn_of(n), _why_unfused(n)))
    g.lint()
    gm.recompile()
    removed = before - len(g.nodes)
    return PassResult(gm, bool(removed or freed), removed, freed,
                      [f"removed {removed} dead nodes", f"freed {freed} unused float constants"])
