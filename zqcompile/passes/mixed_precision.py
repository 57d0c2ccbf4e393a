"""mixed_precision: ZeroQuant-HERO's per-module mode switch, chosen to an accuracy budget. On the calibration
data the fake-quantized graph (feature_scales_search._FakeQuant: per-token activations, planned weight groups)
is scored by its perplexity (next-token loss of its logits): with every planned 8-bit GEMM quantized, then with
each unit alone kept in floating point (its sensitivity). A unit is the GEMMs that read one input (q/k/v;
gate/up; o_proj; down_proj), so a switch never splits GEMMs that run merged. Units are ranked by how much
keeping them recovers and the fewest of that ranking (found by bisection) for which the predicted perplexity
is within the budget of the float graph's are switched to FP16.

Matches: token-wise A8 `aten.linear` with a plan (after feature_scales, so its scales are in). Emits: FP16 plans
for the kept GEMMs (no graph change here; group_wise_weight follows the plan), a FusionRecord per kept GEMM and
one summary ("accuracy-budget"). Generation graphs take the engine graph's choice, by GEMM name.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import fx

from zqcompile.config import FP16
from zqcompile.passes.base import FusionRecord, PassContext, PassResult, aten, calls
from zqcompile.passes.feature_scales_search import FakeQuant, first_float, quantized_a8


def _loss(gm: fx.GraphModule, data: list[tuple], keep: frozenset, cache: dict, quantize: bool = True) -> float:
    """Mean next-token cross entropy of the graph's logits on `data`, GEMMs in `keep` (all if not quantize)
    in float."""
    nll = count = 0
    for inputs in data:
        fq = FakeQuant(gm, [], {}, keep=keep, weights=cache) if quantize else fx.Interpreter(gm)
        n, c = next_token_nll(first_float(fq.run(*inputs)), inputs[0])
        nll, count = nll + n, count + c
    return nll / count


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
        ids = inputs[0][:, : max(2, max_tokens - n)]
        out.append((ids, *[t[:, : ids.shape[1]] if isinstance(t, torch.Tensor) and t.shape == inputs[0].shape else t
                            for t in inputs[1:]]))
        n += ids.numel()
    return out


def choose(gm: fx.GraphModule, ctx: PassContext, gemms: list[fx.Node]) -> dict:
    """{"keep": {fqn: sensitivity of its unit}, "ppl": (float, all quantized, predicted), "evaluated": forwards}."""
    ab = ctx.config.accuracy_budget
    data = calibration_tokens(ctx.calibration_inputs, ab.max_tokens)
    units: dict = {}
    for g in gemms:
        units.setdefault(g.args[0], []).append(g)
    cache: dict = {}
    kept = lambda us: frozenset(g for u in us for g in units[u])  # noqa: E731
    with torch.no_grad():
        ref = _loss(gm, data, frozenset(), cache, quantize=False)
        full = _loss(gm, data, frozenset(), cache)
        target = ref + math.log1p(ab.budget)
        result = {"keep": {}, "ppl": (math.exp(ref), math.exp(full), math.exp(full)), "evaluated": 2}
        if full <= target:
            return result
        gain = {u: full - _loss(gm, data, kept([u]), cache) for u in units}
        ranked = sorted(units, key=lambda u: -gain[u])
        lo, hi, losses = 0, len(ranked), {0: full}  # the fewest k with loss(top k kept) <= target
        while lo < hi:
            mid = (lo + hi) // 2
            losses[mid] = _loss(gm, data, kept(ranked[:mid]), cache) if mid else full
            lo, hi = (lo, mid) if losses[mid] <= target else (mid + 1, hi)
        if lo not in losses:
            losses[lo] = _loss(gm, data, kept(ranked[:lo]), cache)
    result.update(keep={g.meta["zq_gemm"].fqn: math.exp(gain[u]) - 1 for u in ranked[:lo] for g in units[u]},
                  ppl=(math.exp(ref), math.exp(full), math.exp(losses[lo])),
                  evaluated=2 + len(units) + len(losses) - 1)
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
        got = ctx.constants.get(key, lambda: {"keep": {}, "ppl": (0, 0, 0), "evaluated": 0})
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
                                        f"keeping its unit (the GEMMs on its input) in float lowers the calibration "
                                        f"perplexity by {got['keep'][info.fqn]:.2%}"))
    eight = sum(f for n, f in flops.items() if n.meta["zq_gemm"].fqn not in got["keep"])
    fp, full, pred = got["ppl"]
    summary = (f"kept {kept} of {len(gemms)} 8-bit GEMMs in FP16; calibration perplexity fp {fp:.3f}, all 8-bit "
               f"{full:.3f} ({full / fp - 1:+.2%}), predicted {pred:.3f} ({pred / fp - 1:+.2%}, budget "
               f"{ab.budget:.2%}); {eight / max(sum(flops.values()), 1):.1%} of the planned 8-bit GEMM FLOPs stay "
               f"8-bit; {got['evaluated']} fake-quant forwards") if fp else f"kept {kept} GEMMs in FP16 (engine's choice)"
    ctx.fusions.append(FusionRecord("accuracy-budget", "model", sorted(got["keep"]), "FP16 mode switches", summary))
    return PassResult(gm, False, len(gemms), kept, [summary])
