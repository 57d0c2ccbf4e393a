"""The pass pipeline: one ordered list, run by `run_pipeline`, which lints the graph and re-derives every
node's shape/dtype with fake tensors after each pass that changed the graph (the nodes it changed and those
downstream whose inputs changed: ShapeCheck; a full check ends the pipeline), and hands a snapshot to the caller
(for dumps).

Order matters and is the method: fold decomposed ops -> simplify shape-only attention masks -> canonicalize -> classify -> feature-wise scales (HERO, when configured) -> FP16 mode switches to an accuracy budget (when configured) -> merge sibling GEMMs -> quantize weights -> insert activation quant ->
calibrate (static baseline only) -> fuse quant into producers -> fuse dequant into GEMMs -> GEMM epilogues
-> HERO's quantized attention (when configured) -> cleanup.
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
from zqcompile.passes.quantize_attention import quantize_attention
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
    quantize_attention,
    cleanup,
]
# The prefill / decode graphs around the KV cache (generation.py) also fuse their attention: the rotary
# embedding of q and k into one op, then with the KV-cache write of k and v, and SDPA over the cache without the
# repeat_kv copies.
_AT = PIPELINE.index(quantize_attention)  # the attention fusions go before HERO's quantized attention
GENERATION_PIPELINE: list[Pass] = PIPELINE[:_AT] + [fuse_rotary, fuse_kv_write, fuse_gqa_attention] + PIPELINE[_AT:]


@dataclass
class PassRecord:
    name: str
    matched: int
    rewritten: int
    seconds: float
    notes: list[str]


class _FakeProp(FakeTensorProp):
    """FakeTensorProp that keeps a plain-number result in meta['val'] too: torch < 2.13's keeps none (a sym_size of
    a static input), so a capture's symbol stayed there and was reused as the node's value (on the H200's torch
    2.11 every LLaMA W8A8 compile with example batch 1 and max_batch > 1 failed)."""

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, (int, float, bool)):
            n.meta["val"] = out
        return out


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Fake-tensor type check: every node gets meta['val'] (shape, dtype) or the pass broke the graph. A graph
    whose weights are fake already (a streamed compile's skeleton) is checked in their fake mode."""
    mode, fake = _fake_inputs(gm, example_inputs)
    _FakeProp(gm, mode).propagate(*fake)


def _fake_inputs(gm: fx.GraphModule, example_inputs: tuple) -> tuple[FakeTensorMode, list]:
    """The fake mode to check `gm` in (its weights' own where they are fake, else a new one) and the example
    inputs as fake tensors of it."""
    mode = (fake_mode_of(itertools.chain(gm.parameters(), gm.buffers()))
            or FakeTensorMode(allow_non_fake_inputs=True))
    return mode, [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]


_SIG = "zq_shape_sig"  # node.meta key: what the node computed when ShapeCheck last gave it its meta['val']


def _signature(gm: fx.GraphModule, n: fx.Node) -> tuple:
    """What a node's meta['val'] depends on besides its inputs' values: its op, target and arguments (input nodes
    by identity, tensors by identity and metadata); for get_attr / call_module the object the target names now."""
    def arg(a):
        if isinstance(a, fx.Node):
            return ("node", id(a), a.name)
        if isinstance(a, torch.Tensor):
            return ("tensor", id(a), tuple(a.shape), a.dtype, a.device)
        return a if isinstance(a, (int, float, bool, str, type(None))) else ("obj", id(a), type(a).__name__)
    target = n.target if isinstance(n.target, str) else ("fn", id(n.target))
    owned = ()
    if n.op in ("get_attr", "call_module"):
        obj = gm
        for part in n.target.split("."):
            obj = getattr(obj, part, None)
        owned = arg(obj) if isinstance(obj, torch.Tensor) else ("obj", id(obj), type(obj).__name__)
    return (n.op, target, owned, fx.node.map_aggregate(n.args, arg), fx.node.map_aggregate(n.kwargs, arg))


def _meta_key(v):
    """The part of a meta['val'] that downstream shapes can depend on."""
    if isinstance(v, torch.Tensor):
        return ("t", tuple(v.shape), v.dtype, v.device, v.stride() if v.layout == torch.strided else None)
    if isinstance(v, (tuple, list)):
        return tuple(_meta_key(x) for x in v)
    return v if isinstance(v, (int, float, bool, str, type(None))) else ("obj", type(v).__name__)


class ShapeCheck:
    """propagate_shapes for a pipeline, incremental: one fake mode for every pass; after a pass, only the nodes
    it added or changed (their signature differs from the last check's) are re-run, then the nodes whose inputs'
    shapes / dtypes / strides changed, and so on; every other node keeps its meta['val']. The first check runs
    every node (captured graphs carry their capture's fake tensors); `run_pipeline` ends with a full
    `propagate_shapes` in a fresh mode, so what it returns never depends on the incremental bookkeeping."""

    def __init__(self, gm: fx.GraphModule, example_inputs: tuple):
        self.mode, self.inputs = _fake_inputs(gm, example_inputs)
        self.example_inputs = example_inputs
        self.rerun = 0  # nodes run, over all checks (for tests)

    def __call__(self, gm: fx.GraphModule, full: bool = False) -> None:
        prop = _FakeProp(gm, self.mode)
        prop.args_iter = iter(self.inputs)
        changed: set[fx.Node] = set()
        with self.mode:
            for n in gm.graph.nodes:
                sig = _signature(gm, n)
                if (not full and n.op != "placeholder" and "val" in n.meta and n.meta.get(_SIG) == sig
                        and not any(a in changed for a in n.all_input_nodes)):
                    prop.env[n] = n.meta["val"]
                    continue
                before = _meta_key(n.meta["val"]) if "val" in n.meta else object()
                prop.env[n] = prop.run_node(n)
                n.meta[_SIG] = sig
                self.rerun += 1
                if "val" not in n.meta or _meta_key(n.meta["val"]) != before:
                    changed.add(n)


def run_pipeline(gm: fx.GraphModule, ctx: PassContext, passes: list[Pass] | None = None,
                 on_pass: Callable[[str, fx.GraphModule], None] | None = None) -> list[PassRecord]:
    records = []
    check = ShapeCheck(gm, ctx.example_inputs)
    check(gm, full=True)
    if on_pass:
        on_pass("00_captured", gm)
    for i, p in enumerate(passes or PIPELINE, start=1):
        t0 = time.perf_counter()
        res = p(gm, ctx)
        gm = res.graph_module
        gm.graph.lint()
        gm.recompile()
        if res.modified:  # a pass that changed nothing left every node's meta valid
            check(gm)
        records.append(PassRecord(p.__name__, res.matched, res.rewritten, time.perf_counter() - t0, res.notes))
        if on_pass:
            on_pass(f"{i:02d}_{p.__name__}", gm)
    propagate_shapes(gm, ctx.example_inputs)  # the result's meta from scratch, in a fresh mode
    return records


__all__ = ["GENERATION_PIPELINE", "PIPELINE", "PassContext", "PassRecord", "PassResult", "ShapeCheck", "WeightError",
           "propagate_shapes", "run_pipeline"]
