"""cleanup: remove dead nodes and the float weights nothing reads any more (they are replaced by quantized
constants), and flag any QDQ node left unfused so the report shows it (never a silent slow path).

Matches: dead nodes, unused get_attr constants, leftover `zq.dequantize_*`. Emits nothing new.
"""
from __future__ import annotations

from torch import fx

from zqcompile.passes.base import NotFused, PassContext, PassResult, calls, delete_attr, fqn_of, zq


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
        ctx.not_fused.append(NotFused(str(n.target.name()), fqn_of(n),
                                      "consumer is not a GEMM the fusion knows: runs unfused (QDQ)"))
    g.lint()
    gm.recompile()
    removed = before - len(g.nodes)
    return PassResult(gm, bool(removed or freed), removed, freed,
                      [f"removed {removed} dead nodes", f"freed {freed} unused float constants"])
