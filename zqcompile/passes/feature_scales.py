"""feature_scales: ZeroQuant-HERO's feature-wise quantization. Per input channel j of a quantized GEMM's
activation X, a scale s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) moves the activation's outlier channels
into the weight: X W^T = (X / s)(W s)^T. The division is folded offline into the producer of X, so it costs
nothing at run time:
- a RMSNorm / LayerNorm whose output only feeds GEMMs (q/k/v; gate/up or fc1): its weight (and bias) / s;
- the up projection before down_proj (x = act(gate) * up is linear in up): up's rows (and bias) / s.
Producers that are not scale-equivariant are skipped with the reason in the report (a LayerNorm that also
feeds the residual, as in post-LN BERT; GeLU before fc2). alpha is given, or searched per site on the
calibration activations: the candidate with the least relative output error of the site's quantized GEMMs
(the unscaled GEMM is a candidate too, so a site is never made worse on that data).

Calibration runs the float graph on `calibration_inputs`, or on random tokens when there are none. The scales
are computed once per compile (in ctx.constants, by site name) and the generation graphs fold the same ones.

Matches: norm -> linear(s), linear(up) -> mul -> linear(down), with A8 GEMMs reading the scaled activation.
Emits: new weight constants; FusionRecord kind "feature-scales" per site, NotFused for skipped sites.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx

from zqcompile.ops import quant_math as qm
from zqcompile.passes.base import (FusionRecord, NotFused, PassContext, PassResult, add_constant, arg, aten, calls,
                                   drop_constant, fqn_of, get_tensor, set_arg)

_NORMS = (aten.rms_norm.default, aten.layer_norm.default)
_S_RANGE = (1e-4, 1e4)


@dataclass
class Site:
    name: str  # the producer's module FQN (norm) or the down projection's FQN (up -> down)
    kind: str  # "norm" | "up"
    producer: fx.Node  # the norm node, or the up linear
    x: fx.Node  # the activation whose channels are scaled
    gemms: list[fx.Node] = field(default_factory=list)  # the linears that read x


def _quantized_a8(node: fx.Node) -> bool:
    info = node.meta.get("zq_gemm")
    return info is not None and not info.scheme.is_float and info.scheme.act.mode == "token"


def _linear_input_users(x: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """(linears reading x as their input, every other user of x)."""
    lin = [u for u in x.users if u.op == "call_function" and u.target == aten.linear.default and u.args[0] is x]
    return lin, [u for u in x.users if u not in lin]


def find_sites(gm: fx.GraphModule) -> tuple[list[Site], list[NotFused]]:
    sites, skipped = [], []
    for norm in calls(gm, *_NORMS):
        lin, other = _linear_input_users(norm)
        if not any(_quantized_a8(g) for g in lin):
            continue
        name = fqn_of(norm) or norm.name
        w = arg(norm, "weight")
        if other:
            skipped.append(NotFused("feature scales", name, f"the norm's output also feeds {other[0].name} "
                                    f"({other[0].target}), e.g. the residual: scaling the norm would change it"))
        elif not (isinstance(w, fx.Node) and w.op == "get_attr"):
            skipped.append(NotFused("feature scales", name, "the norm has no weight constant to fold the scales into"))
        else:
            sites.append(Site(name, "norm", norm, norm, lin))
    for down in calls(gm, aten.linear.default):
        if not _quantized_a8(down):
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


# ---- calibration ------------------------------------------------------------------------------------------
class _Recorder(fx.Interpreter):
    """Per-channel max|x| and a sample of rows at each site's activation."""

    def __init__(self, gm: fx.GraphModule, sites: list[Site], max_rows: int):
        super().__init__(gm)
        self.watch = {s.x: s.name for s in sites}
        self.max_rows = max_rows
        self.amax: dict[str, torch.Tensor] = {}
        self.rows: dict[str, list[torch.Tensor]] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        name = self.watch.get(n)
        if name is not None:
            x = out.detach().reshape(-1, out.shape[-1]).float()
            a = x.abs().amax(dim=0)
            self.amax[name] = a if name not in self.amax else torch.maximum(self.amax[name], a)
            have = sum(r.shape[0] for r in self.rows.setdefault(name, []))
            if have < self.max_rows:
                self.rows[name].append(x[: self.max_rows - have].clone())
        return out


def calibration_batches(gm: fx.GraphModule, ctx: PassContext) -> tuple[list[tuple], str]:
    """The calibration inputs, or random token batches shaped like them (tokens drawn over the embedding table's
    rows) when none were given; and a note saying which."""
    fs = ctx.config.feature_scales
    if ctx.calibration_inputs:
        return ctx.calibration_inputs, f"{len(ctx.calibration_inputs)} calibration batch(es)"
    ex = ctx.example_inputs
    emb = next((n for n in calls(gm, aten.embedding.default)), None)
    table = get_tensor(gm, emb.args[0]) if emb is not None else None
    if not ex or table is None or ex[0].dtype not in (torch.long, torch.int32) or ex[0].dim() != 2:
        return [ex], "the example inputs (no calibration data; not a token-id model for random tokens)"
    # random_seq tokens where the graph's sequence bound is known; else the example's length
    seq = min(fs.random_seq, ctx.max_seq) if ctx.config.dynamic_seq and ctx.max_seq else ex[0].shape[1]
    batch = fs.random_batch if ctx.config.dynamic_batch else ex[0].shape[0]
    g = torch.Generator().manual_seed(fs.seed)
    batches = []
    for _ in range(fs.random_batches):
        ids = torch.randint(0, table.shape[0], (batch, seq), generator=g).to(ex[0].device, ex[0].dtype)
        rest = [torch.ones_like(ids, dtype=t.dtype) if t.shape == ex[0].shape else t for t in ex[1:]]
        batches.append((ids, *rest))
    return batches, f"{fs.random_batches} batch(es) of {batch} x {seq} random tokens (no calibration data)"


# ---- the scales -------------------------------------------------------------------------------------------
def _fake_w(w: torch.Tensor, node: fx.Node) -> torch.Tensor:
    wq = node.meta["zq_gemm"].scheme.weight
    q, s = qm.quantize_weight(w, wq.bits, wq.granularity, wq.num_groups, wq.group_size)
    return qm.dequantize_weight(q, s, wq.bits, torch.float32)


def _fake_x(x: torch.Tensor) -> torch.Tensor:
    q, s = qm.quantize_per_token(x)
    return q.float() * s


def _site_error(x: torch.Tensor, ws: list[tuple[torch.Tensor, fx.Node]], s: Optional[torch.Tensor]) -> float:
    """Relative squared error of the site's quantized GEMM outputs on the sampled rows, with scales s."""
    err = ref = 0.0
    xs = x if s is None else x / s
    xq = _fake_x(xs)
    for w, node in ws:
        y = x @ w.t()
        wsc = w if s is None else w * s
        yq = xq @ _fake_w(wsc, node).t()
        err += float((yq - y).pow(2).sum())
        ref += float(y.pow(2).sum())
    return err / max(ref, 1e-30)


def _scales(amax_x: torch.Tensor, amax_w: torch.Tensor, alpha: float) -> torch.Tensor:
    s = amax_x.clamp_min(1e-8).pow(alpha) / amax_w.clamp_min(1e-8).pow(1 - alpha)
    return s.clamp(*_S_RANGE)


def compute_scales(gm: fx.GraphModule, ctx: PassContext, sites: list[Site]) -> dict[str, dict]:
    """{site: {"alpha", "s" (fp32 [K]) or None when the unscaled GEMM was best, "error": (before, after)}}."""
    fs = ctx.config.feature_scales
    data, note = calibration_batches(gm, ctx)
    rec = _Recorder(gm, sites, fs.max_tokens)
    with torch.no_grad():
        for inputs in data:
            rec.run(*inputs)
    out = {}
    for site in sites:
        x = torch.cat(rec.rows[site.name]).float()
        ws = [(get_tensor(gm, arg(g, "weight")).detach().float(), g) for g in site.gemms if _quantized_a8(g)]
        amax_w = torch.stack([w.abs().amax(dim=0) for w, _ in ws]).amax(dim=0)
        base = _site_error(x, ws, None)
        best = (base, None, None)
        for alpha in ((fs.alpha,) if fs.alpha is not None else fs.alphas):
            s = _scales(rec.amax[site.name], amax_w, alpha)
            e = _site_error(x, ws, s)
            if e < best[0]:
                best = (e, alpha, s)
        out[site.name] = {"alpha": best[1], "s": best[2], "error": (base, best[0]), "data": note}
    return out


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
    set_arg(node, name, add_constant(gm, f"{old.target}_fws", new, before=node))
    drop_constant(gm, old)


def _fold(gm: fx.GraphModule, ctx: PassContext, site: Site, s: torch.Tensor) -> None:
    p = site.producer
    if site.kind == "norm":
        _replace_constant(gm, ctx, p, "weight", s, _divided)
        if p.target == aten.layer_norm.default:
            _replace_constant(gm, ctx, p, "bias", s, _divided)
    else:  # the up projection's output rows
        _replace_constant(gm, ctx, p, "weight", s, _rows_divided)
        _replace_constant(gm, ctx, p, "bias", s, _divided)
    for g in site.gemms:
        _replace_constant(gm, ctx, g, "weight", s, _multiplied)


def feature_scales(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    fs = ctx.config.feature_scales
    if fs is None:
        return PassResult(gm, False)
    sites, skipped = find_sites(gm)
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
            ctx.not_fused.append(NotFused("feature scales", site.name, f"no alpha beat the unscaled GEMM on the "
                                          f"calibration data (relative error {before:.2e})"))
            continue
        _fold(gm, ctx, site, got["s"])
        folded += 1
        s = got["s"]
        into = "norm weight" + (" and bias" if site.producer.target == aten.layer_norm.default else "") \
            if site.kind == "norm" else "up projection rows"
        ctx.fusions.append(FusionRecord(
            "feature-scales", site.name, [fqn_of(g) for g in site.gemms], f"x / s folded into the {into}",
            f"alpha {got['alpha']:.2f}, s in [{float(s.min()):.3g}, {float(s.max()):.3g}], quantized GEMM error "
            f"{before:.2e} -> {after:.2e} ({got['data']})"))
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, folded > 0, len(sites), folded, [f"{folded} of {len(sites)} sites scaled"])
