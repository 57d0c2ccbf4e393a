"""classify_gemms: find every GEMM (`aten.linear` with a constant weight), name it by module FQN, give it a
role (qkv / attn_out / fc1 / fc2 / head / other) and resolve its scheme from the config (overrides first).

Emits no new nodes: it stores a GemmInfo in node.meta['zq_gemm'] and in ctx.gemms (the plan the report shows).
"""
from __future__ import annotations

from torch import fx

from ..capture import param_fqn
from ..config import classify_role, resolve_scheme
from .base import GemmInfo, PassContext, PassResult, aten, calls, fqn_of, get_tensor, module_stack


def classify_gemms(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    ctx.gemms.clear()
    matched = 0
    for node in calls(gm, aten.linear.default):
        w = get_tensor(gm, node.args[1])
        if w is None or w.dim() != 2:
            continue  # activation x activation products (attention scores) are not weight GEMMs
        matched += 1
        fqn = fqn_of(node) or param_fqn(node.args[1].target).rsplit(".", 1)[0]
        role = classify_role(fqn)
        types = [t for _, t in module_stack(node)]
        scheme, rule = resolve_scheme(ctx.config, fqn, role, types)
        info = GemmInfo(fqn, role, scheme, rule, tuple(w.shape))
        node.meta["zq_gemm"] = info
        ctx.gemms.append(info)
    return PassResult(gm, False, matched, 0, [f"{matched} GEMMs found"])
