"""Run the pipeline up to a pass on a tiny hand-built module, to test one pass against eager numerics."""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import fx, nn

from zqcompile.capture import capture
from zqcompile.config import get_config
from zqcompile.passes import PIPELINE, PassContext, propagate_shapes


def captured(module: nn.Module, *inputs):
    gm, _ = capture(module.eval(), inputs)
    propagate_shapes(gm, inputs)
    return gm


def run_until(gm: fx.GraphModule, ctx: PassContext, last: str):
    """Run PIPELINE passes up to and including `last`; return that pass's result."""
    res = None
    for p in PIPELINE:
        res = p(gm, ctx)
        gm.recompile()
        propagate_shapes(gm, ctx.example_inputs)
        if p.__name__ == last:
            return res
    raise KeyError(last)


def before_and_after(module: nn.Module, inputs: tuple, config, last: str, merge_gemms: bool = False):
    """(output before `last`, output after, its PassResult, gm, ctx). Sibling-GEMM merging is off unless
    asked for, so each pass is seen on the separate q/k/v GEMMs."""
    gm = captured(module, *inputs)
    ctx = PassContext(replace(get_config(config), merge_gemms=merge_gemms), inputs)
    names = [p.__name__ for p in PIPELINE]
    prev = names[names.index(last) - 1] if names.index(last) else None
    if prev:
        run_until(gm, ctx, prev)
    with torch.no_grad():
        before = gm(*inputs)
    p = PIPELINE[names.index(last)]
    res = p(gm, ctx)
    gm.recompile()
    propagate_shapes(gm, inputs)
    with torch.no_grad():
        after = gm(*inputs)
    return before, after, res, gm, ctx


def count(gm: fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


class Block(nn.Module):
    """Post-LN style block with every fusion candidate: residual add -> LayerNorm -> q/k/v (shared input)
    -> fc1 -> GeLU -> fc2 (+ residual)."""

    def __init__(self, d: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.ln = nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.act = nn.GELU()

    def forward(self, x, r):
        h = x + r
        y = self.ln(h)
        a = self.q_proj(y) * self.k_proj(y) + self.v_proj(y)
        return self.fc2(self.act(self.fc1(a))) + h
