"""calibrate_static_ranges: the static PTQ baseline's calibration. Runs the graph on the calibration inputs,
records max|x| at every `zq.quantize_per_tensor` input, and sets its scale to amax / 127 (per tensor).

Matches: `zq.quantize_per_tensor` nodes. Emits nothing new; it fills their scale constants.
"""
from __future__ import annotations

import torch
from torch import fx

from zqcompile.ops import quant_math as qm
from zqcompile.passes.base import PassContext, PassResult, arg, calls, zq


class _AmaxRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watch: set[fx.Node]):
        super().__init__(gm)
        self.watch = watch
        self.amax: dict[str, float] = {}

    def run_node(self, n: fx.Node):
        if n in self.watch:
            x = self.env[arg(n, "x")]
            a = float(x.detach().abs().max()) if x.numel() else 0.0
            key = arg(n, "scale").target
            self.amax[key] = max(self.amax.get(key, 0.0), a)
        return super().run_node(n)


def calibrate_static_ranges(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    nodes = calls(gm, zq.quantize_per_tensor.default)
    if not nodes:
        return PassResult(gm, False)
    data = ctx.calibration_inputs or [ctx.example_inputs]
    rec = _AmaxRecorder(gm, set(nodes))
    with torch.no_grad():
        for inputs in data:
            rec.run(*inputs)
    for target, amax in rec.amax.items():
        setattr(gm, target, torch.tensor(qm.calibrated_scale(amax), dtype=torch.float32))
    return PassResult(gm, True, len(nodes), len(rec.amax), [f"calibrated {len(rec.amax)} ranges on {len(data)} batch(es)"])
