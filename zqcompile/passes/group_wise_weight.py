"""group_wise_weight: quantize each planned GEMM's weight group-wise (ZeroQuant Sec. 4.1) to INT8 or packed
INT4 with fp32 scales in the layout the GEMM reads ([N, K // group_k]).

Matches: `aten.linear(x, W, b)` carrying a quantized plan. Emits: `aten.linear(x, zq.dequantize_weight(wq,
w_scale), b)` (the QDQ form fused later). FP GEMMs with a float_dtype switch get casts around the linear.
"""
from __future__ import annotations

import torch
from torch import fx

from zqcompile.config import weight_groups_error
from zqcompile.ops import quant_math as qm
from zqcompile.passes.base import (PassContext, PassResult, add_constant, aten, calls, copy_meta, drop_constant, dtype_of,
                                   get_tensor, zq)

_FLOAT = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _cast_float_gemm(gm: fx.GraphModule, node: fx.Node, dtype: torch.dtype) -> None:
    orig = dtype_of(node)
    if orig == dtype:
        return
    g = gm.graph
    with g.inserting_before(node):
        args = [g.call_function(aten._to_copy.default, (a,), {"dtype": dtype}) if isinstance(a, fx.Node) else a
                for a in node.args[:3]]
    node.args = tuple(args) + tuple(node.args[3:])
    with g.inserting_after(node):
        back = g.call_function(aten._to_copy.default, (node,), {"dtype": orig})
    node.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
    copy_meta(back, node)


def group_wise_weight(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    matched = rewritten = 0
    for node in calls(gm, aten.linear.default):
        info = node.meta.get("zq_gemm")
        if info is None:
            continue
        matched += 1
        scheme = info.scheme
        if scheme.is_float:
            if scheme.float_dtype:
                _cast_float_gemm(gm, node, _FLOAT[scheme.float_dtype])
            continue
        wq_cfg = scheme.weight
        w = get_tensor(gm, node.args[1])
        try:  # classify_gemms checked every plan against its weight already; this names a custom plan's error
            wq, ws = ctx.constants.derive(qm.quantize_weight, w, wq_cfg.bits, wq_cfg.granularity,
                                          wq_cfg.num_groups, wq_cfg.group_size)
        except ValueError as e:
            raise weight_groups_error(info.fqn, tuple(w.shape), wq_cfg, str(e)) from None
        wq_node = add_constant(gm, info.fqn + ".wq", wq, before=node)
        ws_node = add_constant(gm, info.fqn + ".w_scale", ws, before=node)
        with gm.graph.inserting_before(node):
            dq = gm.graph.call_function(zq.dequantize_weight.default, (wq_node, ws_node, wq_cfg.bits, dtype_of(node)))
        copy_meta(dq, node)
        dq.meta.pop("zq_gemm", None)
        old_weight = node.args[1]
        node.args = (node.args[0], dq, *node.args[2:])
        drop_constant(gm, old_weight)  # the float weight is freed now (a concatenated one had no other owner)
        rewritten += 1
    return PassResult(gm, rewritten > 0, matched, rewritten, [f"{rewritten} weights quantized"])
