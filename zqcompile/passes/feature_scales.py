"""feature_scales: ZeroQuant-HERO's feature-wise quantization. Per input channel j of a quantized GEMM's
activation X, a scale s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) moves the activation's outlier channels
into the weight: X W^T = (X / s)(W s)^T. The division is folded offline into the producer of X, so it costs
nothing at run time:
- a RMSNorm / LayerNorm whose output only feeds GEMMs (q/k/v; gate/up or fc1): its weight (and bias) / s;
- the up projection before down_proj (x = act(gate) * up is linear in up): up's rows (and bias) / s;
- a norm whose output also feeds something else (post-LN BERT: the residual): a copy of the norm, with weight
  (and bias) / s, feeds the GEMMs (FeatureScales.norm_copies; one more norm per site at run time).
Producers that are not scale-equivariant are skipped with the reason in the report (GeLU before fc2). alpha is given, or searched on the calibration data
(passes/feature_scales_search.py). The scales are computed once per compile (in ctx.constants, by site name)
and the generation graphs fold the same ones.

Matches: norm -> linear(s) (and other users: copied), linear(up) -> mul -> linear(down), with A8 GEMMs reading
the scaled activation.
Emits: new weight constants; FusionRecord kind "feature-scales" per site, NotFused for skipped sites.
"""
from __future__ import annotations

import torch
from torch import fx

from zqcompile.passes.base import (FusionRecord, NotFused, PassContext, PassResult, add_constant, arg, aten, calls,
                                   drop_constant, fqn_of, get_tensor, same_param, set_arg)
from zqcompile.passes.feature_scales_search import Site, compute_scales, quantized_a8

_NORMS = (aten.rms_norm.default, aten.layer_norm.default)


def _linear_input_users(x: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """(linears reading x as their input, every other user of x)."""
    lin = [u for u in x.users if u.op == "call_function" and u.target == aten.linear.default and u.args[0] is x]
    return lin, [u for u in x.users if u not in lin]


def find_sites(gm: fx.GraphModule, norm_copies: bool = True) -> tuple[list[Site], list[NotFused]]:
    sites, skipped = [], []
    for norm in calls(gm, *_NORMS):
        lin, other = _linear_input_users(norm)
        if not any(quantized_a8(g) for g in lin):
            continue
        name = fqn_of(norm) or norm.name
        w = arg(norm, "weight")
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            skipped.append(NotFused("feature scales", name, "the norm has no weight constant to fold the scales into"))
        elif other and not norm_copies:
            skipped.append(NotFused("feature scales", name, f"the norm's output also feeds {other[0].name} "
                                    f"({other[0].target}), e.g. the residual: scaling the norm would change it "
                                    f"(FeatureScales(norm_copies=True) gives the GEMMs a scaled copy)"))
        else:
            sites.append(Site(name, "norm-copy" if other else "norm", norm, norm, lin))
    for down in calls(gm, aten.linear.default):
        if not quantized_a8(down):
            continue
        x = down.args[0]
        name = fqn_of(down) or down.name
        if not isinstance(x, fx.Node) or x.op != "call_function":
            continue
        if x.target in (aten.gelu.default, aten.relu.default):
            skipped.append(NotFused("feature scales", name, f"{x.target} before this GEMM is not scale-equivariant"))
            continue
        if x.target != aten.mul.Tensor or len(x.users) != 1:
            continue
        ups = [a for a in x.args if isinstance(a, fx.Node) and a.op == "call_function" and a.target == aten.linear.default
               and len(a.users) == 1 and arg(a, "weight").op == "get_attr"]
        if len(ups) == 1:
            sites.append(Site(name, "up", ups[0], x, [down]))
    return sites, skipped


# ---- folding ----------------------------------------------------------------------------------------------
def _divided(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return w / s


def _rows_divided(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return w / s[:, None]


def _multiplied(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return w * s


def scaled_constant(fn, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """fn(t, s) in fp32, back in t's dtype."""
    return fn(t.detach().float(), s).to(t.dtype).contiguous()


def _replace_constant(gm: fx.GraphModule, ctx: PassContext, node: fx.Node, name: str, s: torch.Tensor, fn) -> None:
    """Replace the constant argument `name` of `node` by fn(constant, s) (made once per compile); an argument
    that is not a constant (None: no bias) is left as it is."""
    old = arg(node, name)
    if not (isinstance(old, fx.Node) and old.op == "get_attr"):
        return
    t = get_tensor(gm, old)
    new = ctx.constants.derive(scaled_constant, fn, t, s)
    folded = add_constant(gm, f"{old.target}_fws", new, before=node)
    same_param(folded, old)  # still that parameter, folded (an export writes it under its name)
    set_arg(node, name, folded)
    drop_constant(gm, old)


def _copy_norm(gm: fx.GraphModule, site: Site) -> fx.Node:
    """A second norm node for the site's GEMMs; the original keeps its other users (the residual). The copy goes
    first: when a residual add fuses into the copy's quantization, the original then reads the sum it emits."""
    with gm.graph.inserting_before(site.producer):
        copy = gm.graph.node_copy(site.producer)
    copy.meta = dict(site.producer.meta)
    for g in site.gemms:
        g.replace_input_with(site.producer, copy)
    return copy


def _fold(gm: fx.GraphModule, ctx: PassContext, site: Site, s: torch.Tensor) -> None:
    p = site.producer
    if site.kind in ("norm", "norm-copy"):
        p = _copy_norm(gm, site) if site.kind == "norm-copy" else p
        _replace_constant(gm, ctx, p, "weight", s, _divided)
        if p.target == aten.layer_norm.default:
            _replace_constant(gm, ctx, p, "bias", s, _divided)
    else:  # the up projection's output rows
        _replace_constant(gm, ctx, p, "weight", s, _rows_divided)
        _replace_constant(gm, ctx, p, "bias", s, _divided)
    for g in site.gemms:
        _replace_constant(gm, ctx, g, "weight", s, _multiplied)


_INTO = {"norm": "the norm weight", "norm-copy": "a copy of the norm's weight", "up": "the up projection rows"}


def feature_scales(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    fs = ctx.config.feature_scales
    if fs is None:
        return PassResult(gm, False)
    sites, skipped = find_sites(gm, fs.norm_copies)
    ctx.not_fused.extend(skipped)
    if not sites:
        return PassResult(gm, False, 0, 0, ["no site where feature-wise scales fold into a producer"])
    if ctx.calibrate_feature_scales:
        scales = ctx.constants.get(("feature_scales", fs, ctx.config.name), lambda: compute_scales(gm, ctx, sites))
    else:  # a generation graph: the engine graph's scales, by site name
        scales = ctx.constants.get(("feature_scales", fs, ctx.config.name), lambda: {})
    folded = 0
    for site in sites:
        got = scales.get(site.name)
        if got is None:
            ctx.not_fused.append(NotFused("feature scales", site.name, "no scales were calibrated for this site"))
            continue
        before, after = got["error"]
        if got["s"] is None:
            ctx.not_fused.append(NotFused("feature scales", site.name, f"no alpha beat no scales on the "
                                          f"calibration data ({got['search']}; GEMM error {before:.2e})"))
            continue
        _fold(gm, ctx, site, got["s"])
        folded += 1
        s = got["s"]
        into = _INTO[site.kind] + (" and bias" if site.kind != "up" and site.producer.target == aten.layer_norm.default
                                   else "")
        if site.kind == "norm-copy":
            into += f" (the norm itself still feeds {', '.join(u.name for u in site.producer.users)})"
        ctx.fusions.append(FusionRecord(
            "feature-scales:norm-copy" if site.kind == "norm-copy" else "feature-scales", site.name,
            [fqn_of(g) for g in site.gemms], f"x / s folded into {into}",
            f"alpha {got['alpha']:.2f}, s in [{float(s.min()):.3g}, {float(s.max()):.3g}], quantized GEMM error "
            f"{before:.2e} -> {after:.2e} ({got['data']}; alpha by {got['search']})"))
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, folded > 0, len(sites), folded, [f"{folded} of {len(sites)} sites scaled"])
