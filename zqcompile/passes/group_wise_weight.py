"""group_wise_weight: quantize each planned GEMM's weight group-wise (ZeroQuant Sec. 4.1) to INT8 or packed
INT4 (or per row to FP8 E4M3) with fp32 scales in the layout the GEMM reads ([N, K // group_k]); a tensor-parallel rank's weight as its
slice of the full weight's quantization (ctx.weight_shards). A GEMM whose modules all have a stored
quantized weight (ctx.stored_weights: a compressed-tensors checkpoint) takes those values and scales as they
are, stacked in row order, never quantized again.

Matches: `aten.linear(x, W, b)` carrying a quantized plan. Emits: `aten.linear(x, zq.dequantize_weight(wq,
w_scale), b)` (the QDQ form fused later). FP GEMMs with a float_dtype switch get casts around the linear.
"""
from __future__ import annotations

import torch
from torch import fx

from zqcompile.config import ConfigError, WeightQuant, weight_groups_error
from zqcompile.ops import quant_math as qm
from zqcompile.passes.base import (GemmInfo, PassContext, PassResult, add_constant, aten, calls, copy_meta,
                                   drop_constant, dtype_of, get_tensor, zq)

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


def _weight_parts(gm: fx.GraphModule, w: fx.Node) -> list[torch.Tensor]:
    """The float weight of a GEMM, or the parts of the `aten.cat` that concat_sibling_gemms left for it."""
    if w.op == "call_function" and w.target == aten.cat.default:
        return [get_tensor(gm, p) for p in w.args[0]]
    return [get_tensor(gm, w)]


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def quantized_parts(bits: int, granularity: str, num_groups: int | None, group_size: int | None, two_level: bool,
                    *parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_weight of the parts' concatenation (a derived constant's recipe: the concatenation is made
    only while the rows are quantized)."""
    return qm.quantize_weight(_cat(list(parts)), bits, granularity, num_groups, group_size, two_level=two_level)


def fp8_parts(*parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_weight_fp8 of the parts' concatenation (per-row E4M3 weights and their fp32 scales)."""
    return qm.quantize_weight_fp8(_cat(list(parts)))


def _stored(ctx: PassContext, info: GemmInfo, weights: list[torch.Tensor], wq_cfg: WeightQuant):
    """make() for the GEMM's stored weights, or None when its modules have none. A plan that does not read them
    as they were stored (other bits or groups) is an error, never a silent re-quantization."""
    parts = [ctx.stored_weights.get(fqn) for fqn, _ in info.parts]
    if not any(p is not None for p in parts):
        return None
    if wq_cfg.dtype == "fp8":
        raise ConfigError(f"{info.fqn}: the checkpoint stores INT{parts[0].bits} weights and the plan reads FP8 "
                          f"weights; compile it with an INT8 scheme (e.g. 'w8a8'), never re-quantized")
    shape, device = (sum(t.shape[0] for t in weights), weights[0].shape[1]), weights[0].device
    missing = [fqn for (fqn, _), p in zip(info.parts, parts) if p is None]
    if missing:
        raise ConfigError(f"{info.fqn}: the checkpoint stores quantized weights for some of its modules but not "
                          f"for {missing}; give them one scheme")
    gk = qm.check_weight_groups(shape, wq_cfg.bits, wq_cfg.granularity, wq_cfg.num_groups, wq_cfg.group_size)
    for (fqn, rows), p in zip(info.parts, parts):
        if p.bits != wq_cfg.bits or tuple(p.values.shape) != (rows, shape[1]) \
                or tuple(p.scale.shape) != (rows, shape[1] // gk):
            raise ConfigError(f"{fqn}: the checkpoint stores INT{p.bits} values {tuple(p.values.shape)} with scales "
                              f"{tuple(p.scale.shape)}, the plan reads {wq_cfg.describe()} of [{rows}, {shape[1]}]")
        if wq_cfg.group_scales == "two-level" and not qm.is_two_level(p.scale):
            raise ConfigError(f"{fqn}: the plan reads two-level group scales and the checkpoint's are not (they "
                              f"would be re-quantized, which is never done): compile it with group_scales='fp32'")

    def make():
        values, scale = torch.cat([p.values for p in parts]), torch.cat([p.scale for p in parts])
        values = qm.pack_int4(values) if wq_cfg.bits == 4 else values
        return values.to(device).contiguous(), scale.to(device, torch.float32).contiguous()
    return make


def group_wise_weight(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    matched = rewritten = stored = 0
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
        parts = _weight_parts(gm, node.args[1])
        fp8 = wq_cfg.dtype == "fp8"  # E4M3 weights, one scale per row
        groups = ("fp8",) if fp8 else (wq_cfg.bits, wq_cfg.granularity, wq_cfg.num_groups, wq_cfg.group_size,
                                       wq_cfg.group_scales == "two-level")
        # A tensor-parallel rank's weight is exactly its slice of the full weight's quantization. Merged parts are
        # column-parallel rows whose scales are per row or K group (classify_gemms refused the rest): the rows
        # carry them, so quantizing their concatenation is that slice already.
        shard = ctx.shard_of(parts[0]) if len(parts) == 1 else None
        try:  # classify_gemms checked every plan against its weight already; this names a custom plan's error
            make = _stored(ctx, info, parts, wq_cfg)
            stored += make is not None
            if make is None and shard is not None:
                make = ((lambda: qm.quantize_weight_fp8_shard(shard.full, parts[0], shard.dim, shard.start)) if fp8
                        else (lambda: qm.quantize_weight_shard(shard.full, parts[0], shard.dim, shard.start, *groups)))
            # A merged GEMM's float concatenation lives only while its rows are quantized; the recipe names the
            # parts, so the generation graphs find the quantized weight without concatenating again. Stored and
            # sharded weights are memoized only: a streamed compile, which remakes constants, takes neither.
            wq, ws = (ctx.constants.get(("quantize_weight", *groups, *parts), make) if make is not None
                      else ctx.constants.derive(fp8_parts, *parts) if fp8
                      else ctx.constants.derive(quantized_parts, *groups, *parts))
        except ValueError as e:
            shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
            raise weight_groups_error(info.fqn, shape, wq_cfg, str(e)) from None
        wq_node = add_constant(gm, info.fqn + ".wq", wq, before=node)
        ws_node = add_constant(gm, info.fqn + ".w_scale", ws, before=node)
        with gm.graph.inserting_before(node):
            dq = gm.graph.call_function(zq.dequantize_weight.default, (wq_node, ws_node, wq_cfg.bits, dtype_of(node)))
        copy_meta(dq, node)
        dq.meta.pop("zq_gemm", None)
        old_weight = node.args[1]
        node.args = (node.args[0], dq, *node.args[2:])
        if old_weight.op == "call_function":  # the deferred concatenation of merged GEMMs
            inputs = list(old_weight.args[0])
            gm.graph.erase_node(old_weight)
            for part in inputs:
                drop_constant(gm, part)
        else:
            drop_constant(gm, old_weight)  # the float weight is freed now (a scaled one had no other owner)
        rewritten += 1
    notes = [f"{rewritten - stored} weights quantized"] + ([f"{stored} weights as the checkpoint stored them"]
                                                          if stored else [])
    return PassResult(gm, rewritten > 0, matched, rewritten, notes)
