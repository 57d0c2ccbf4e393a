"""mixed_precision: ZeroQuant-HERO's per-module mode switch, chosen to an accuracy budget. On the calibration
data the fake-quantized graph (feature_scales_search.FakeQuant: per-token activations, planned weight groups)
is scored against the float graph by the budget's metric (passes/budget_metric.py: the next-token KL for causal
LMs, the least sentence-embedding cosine for encoders): with every planned 8-bit GEMM quantized, then, on the
first rank_tokens tokens, with each unit alone kept in floating point (its sensitivity). A unit is the GEMMs
that read one input (q/k/v; gate/up; o_proj; down_proj), so a switch never splits GEMMs that run merged. Units
are ranked by how much keeping them recovers and the fewest of that ranking (found by bisection, on every
calibration token) that bring the predicted loss within the budget are switched to FP16.

Matches: token-wise A8 `aten.linear` with a plan (after feature_scales, so its scales are in). Emits: FP16 plans
for the kept GEMMs (no graph change here; group_wise_weight follows the plan), a FusionRecord per kept GEMM and
one summary ("accuracy-budget"). Generation graphs take the engine graph's choice, by GEMM name.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import fx

from zqcompile.config import FP16
from zqcompile.passes.budget_metric import BudgetMetric, metric_for
from zqcompile.passes.base import FusionRecord, PassContext, PassResult, aten, calls
from zqcompile.passes.feature_scales_search import FakeQuant, first_float, quantized_a8


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """(summed cross entropy of each next token, tokens predicted) for logits [B, T, V] of ids [B, T]."""
    logits = logits.float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).to(logits.device),
                          reduction="sum")
    return float(nll), ids[:, 1:].numel()


def calibration_tokens(data: list[tuple], max_tokens: int) -> list[tuple]:
    """The calibration batches cut to at most `max_tokens` tokens in all (each at least 2, one prediction)."""
    out, n = [], 0
    for inputs in data:
        if n >= max_tokens:
            break
        ids = inputs[0][:, : max(2, (max_tokens - n) // inputs[0].shape[0])]
        out.append((ids, *[t[:, : ids.shape[1]] if isinstance(t, torch.Tensor) and t.shape == inputs[0].shape else t
                            for t in inputs[1:]]))
        n += ids.numel()
    return out


class _Scorer:
    """The metric's loss of the fake-quantized graph (GEMMs in `keep` in float) on calibration batches, against
    the float graph's outputs, computed once; fake-quantized weights are cached across calls."""

    def __init__(self, gm: fx.GraphModule, metric: BudgetMetric, data: list[tuple]):
        self.gm, self.metric, self.data, self.cache = gm, metric, data, {}
        self.refs = [metric.reference(first_float(fx.Interpreter(gm).run(*x)), x) for x in data]
        self.forwards = 1

    def __call__(self, keep: frozenset) -> float:
        vals = []
        for inputs, ref in zip(self.data, self.refs):
            out = FakeQuant(self.gm, [], {}, keep=keep, weights=self.cache).run(*inputs)
            vals.append(self.metric.values(first_float(out), ref, inputs))
        self.forwards += 1
        return self.metric.loss(vals)


def choose(gm: fx.GraphModule, ctx: PassContext, gemms: list[fx.Node]) -> dict:
    """{"keep": {fqn: what keeping its unit recovers}, "loss": (all quantized, predicted), "metric", "tokens",
    "evaluated": forwards}."""
    ab = ctx.config.accuracy_budget
    metric = metric_for(ab.metric, ctx.input_names)
    data = calibration_tokens(ctx.calibration_inputs, ab.max_tokens)
    rank = calibration_tokens(data, ab.rank_tokens)
    units: dict = {}
    for g in gemms:
        units.setdefault(g.args[0], []).append(g)
    kept = lambda us: frozenset(g for u in us for g in units[u])  # noqa: E731
    tokens = sum(x[0].numel() for x in data)
    with torch.no_grad():
        score = _Scorer(gm, metric, data)
        full = score(frozenset())
        result = {"keep": {}, "loss": (full, full), "metric": metric, "tokens": tokens}
        if metric.increase(full) > ab.budget:
            # rank on the first batches: the whole calibration set once per unit would cost 120 full forwards on
            # a 30-layer model; the ranking needs only the order, the choice below is checked on every token
            ranker = _Scorer(gm, metric, rank)
            base = ranker(frozenset())
            gain = {u: base - ranker(kept([u])) for u in units}
            ranked = sorted(units, key=lambda u: -gain[u])
            lo, hi, losses = 0, len(ranked), {0: full}  # the fewest k with increase(top k kept) <= budget
            while lo < hi:
                mid = (lo + hi) // 2
                losses[mid] = score(kept(ranked[:mid])) if mid else full
                lo, hi = (lo, mid) if metric.increase(losses[mid]) <= ab.budget else (mid + 1, hi)
            if lo not in losses:
                losses[lo] = score(kept(ranked[:lo]))
            result.update(keep={g.meta["zq_gemm"].fqn: gain[u] for u in ranked[:lo] for g in units[u]},
                          loss=(full, losses[lo]))
            score.forwards += ranker.forwards
    result["evaluated"] = score.forwards
    return result


def mixed_precision(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    ab = ctx.config.accuracy_budget
    if ab is None:
        return PassResult(gm, False)
    gemms = [n for n in calls(gm, aten.linear.default) if quantized_a8(n)]
    key = ("accuracy_budget", ab, ctx.config.name)
    if ctx.calibrate_feature_scales:
        got = ctx.constants.get(key, lambda: choose(gm, ctx, gemms))
    else:  # a generation graph: the engine graph's choice
        got = ctx.constants.get(key, lambda: {"keep": {}})
    flops = {n: n.meta["zq_gemm"].shape[0] * n.meta["zq_gemm"].shape[1] for n in gemms}
    kept = 0
    for n in gemms:
        info = n.meta["zq_gemm"]
        if info.fqn not in got["keep"]:
            continue
        new = replace(info, scheme=FP16, rule=f"accuracy budget {ab.budget:.2%}")
        n.meta["zq_gemm"] = new
        ctx.gemms[ctx.gemms.index(info)] = new
        kept += 1
        ctx.fusions.append(FusionRecord("mode-switch", info.fqn, [info.fqn], "FP16 GEMM (accuracy budget)",
                                        f"keeping its unit (the GEMMs on its input) in float lowers the "
                                        f"{got['metric'].kind} loss by {got['keep'][info.fqn]:.2e}"))
    eight = sum(f for n, f in flops.items() if n.meta["zq_gemm"].fqn not in got["keep"])
    if "metric" in got:
        m, (full, pred) = got["metric"], got["loss"]
        summary = (f"kept {kept} of {len(gemms)} 8-bit GEMMs in FP16; on {got['tokens']} calibration tokens, all "
                   f"8-bit {m.describe(full)}, predicted {m.describe(pred)} ({m.budget_text(ab.budget)}); "
                   f"{eight / max(sum(flops.values()), 1):.1%} of the planned 8-bit GEMM FLOPs stay 8-bit; "
                   f"{got['evaluated']} forwards")
    else:
        summary = f"kept {kept} GEMMs in FP16 (engine's choice)"
    ctx.fusions.append(FusionRecord("accuracy-budget", "model", sorted(got["keep"]), "FP16 mode switches", summary))
    return PassResult(gm, False, len(gemms), kept, [summary])
