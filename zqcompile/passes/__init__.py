"""The pass pipeline: one ordered list, run by `run_pipeline`, which lints the graph and re-derives every
node's shape/dtype with fake tensors after each pass that changed the graph, and hands a snapshot to the caller (for dumps).

Order matters and is the method: fold decomposed ops -> simplify shape-only attention masks -> canonicalize -> classify -> feature-wise scales (HERO, when configured) -> FP16 mode switches to an accuracy budget (when configured) -> merge sibling GEMMs -> quantize weights -> insert activation quant ->
calibrate (static baseline only) -> fuse quant into producers -> fuse dequant into GEMMs -> GEMM epilogues
-> cleanup.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from zqcompile.capture import fake_mode_of
from zqcompile.passes.base import PassContext, PassResult
from zqcompile.passes.calibrate_static import calibrate_static_ranges
from zqcompile.passes.canonicalize import canonicalize_gemms
from zqcompile.passes.classify_gemms import WeightError, classify_gemms
from zqcompile.passes.concat_sibling_gemms import concat_sibling_gemms
from zqcompile.passes.cleanup import cleanup
from zqcompile.passes.feature_scales import feature_scales
from zqcompile.passes.fold_decomposed import fold_decomposed_ops
from zqcompile.passes.fuse_gemm_dequant import fuse_gemm_dequant
from zqcompile.passes.fuse_gemm_epilogue import fuse_gemm_epilogue
from zqcompile.passes.fuse_gqa_attention import fuse_gqa_attention
from zqcompile.passes.fuse_kv_write import fuse_kv_write
from zqcompile.passes.fuse_producer_quant import fuse_producer_quant
from zqcompile.passes.fuse_rotary import fuse_rotary
from zqcompile.passes.group_wise_weight import group_wise_weight
from zqcompile.passes.mixed_precision import mixed_precision
from zqcompile.passes.simplify_attention_masks import simplify_attention_masks
from zqcompile.passes.token_wise_quant import token_wise_quant

Pass = Callable[[fx.GraphModule, PassContext], PassResult]

PIPELINE: list[Pass] = [
    fold_decomposed_ops,
    simplify_attention_masks,
    canonicalize_gemms,
    classify_gemms,
    feature_scales,
    mixed_precision,
    concat_sibling_gemms,
    group_wise_weight,
    token_wise_quant,
    calibrate_static_ranges,
    fuse_producer_quant,
    fuse_gemm_dequant,
    fuse_gemm_epilogue,
    cleanup,
]
# The prefill / decode graphs around the KV cache (generation.py) also fuse their attention: the rotary
# embedding of q and k into one op, then with the KV-cache write of k and v, and SDPA over the cache without the
# repeat_kv copies.
GENERATION_PIPELINE: list[Pass] = PIPELINE[:-1] + [fuse_rotary, fuse_kv_write, fuse_gqa_attention, cleanup]


@dataclass
class PassRecord:
    name: str
    matched: int
    rewritten: int
    seconds: float
    notes: list[str]


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Fake-tensor type check: every node gets meta['val'] (shape, dtype) or the pass broke the graph. A graph
    whose weights are fake already (a streamed compile's skeleton) is checked in their fake mode."""
    mode = (fake_mode_of(itertools.chain(gm.parameters(), gm.buffers()))
            or FakeTensorMode(allow_non_fake_inputs=True))
    fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]
    FakeTensorProp(gm, mode).propagate(*fake)


def run_pipeline(gm: fx.GraphModule, ctx: PassContext, passes: list[Pass] | None = None,
                 on_pass: Callable[[str, fx.GraphModule], None] | None = None) -> list[PassRecord]:
    records = []
    propagate_shapes(gm, ctx.example_inputs)
    if on_pass:
        on_pass("00_captured", gm)
    for i, p in enumerate(passes or PIPELINE, start=1):
        t0 = time.perf_counter()
        res = p(gm, ctx)
        gm = res.graph_module
        gm.graph.lint()
        gm.recompile()
        if res.modified:  # a pass that changed nothing left every node's meta valid
            propagate_shapes(gm, ctx.example_inputs)
        records.append(PassRecord(p.__name__, res.matched, res.rewritten, time.perf_counter() - t0, res.notes))
        if on_pass:
            on_pass(f"{i:02d}_{p.__name__}", gm)
    return records


__all__ = ["GENERATION_PIPELINE", "PIPELINE", "PassContext", "PassRecord", "PassResult", "WeightError", "propagate_shapes", "run_pipeline"]
