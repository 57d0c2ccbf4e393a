"""The calibration and alpha search of feature_scales (ZeroQuant-HERO's feature-wise quantization).

Calibration runs the float graph on `calibration_inputs` (random tokens when there are none) and records, at
each site's activation, the per-channel max|x| and a sample of rows. alpha is then given, or searched:
- `search="model"` (default): one alpha for every site, the candidate (or no scales at all) whose fake-quantized
  graph -- every token-wise A8 GEMM with per-token activations and its planned weight groups -- gives the least
  relative error of the graph's output (the logits) on the calibration data. Each site's own least-error alpha
  picks lower values than are best for the model (SmolLM2: per site +1.10% perplexity, one alpha 0.7 +0.71%).
- `search="site"`: per site, the candidate with the least relative error of the site's quantized GEMM outputs
  (the unscaled GEMM is a candidate too).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx

from zqcompile.ops import quant_math as qm
from zqcompile.passes.base import PassContext, arg, aten, calls, get_tensor

_S_RANGE = (1e-4, 1e4)


@dataclass
class Site:
    name: str  # the producer's module FQN (norm) or the down projection's FQN (up -> down)
    kind: str  # "norm" | "up"
    producer: fx.Node  # the norm node, or the up linear
    x: fx.Node  # the activation whose channels are scaled
    gemms: list[fx.Node] = field(default_factory=list)  # the linears that read x


def quantized_a8(node: fx.Node) -> bool:
    info = node.meta.get("zq_gemm")
    return info is not None and not info.scheme.is_float and info.scheme.act.mode == "token"


def first_float(out) -> Optional[torch.Tensor]:
    """The graph's first floating-point output (the logits / last hidden state)."""
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() else None
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for o in out:
            t = first_float(o)
            if t is not None:
                return t
    return None


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


class FakeQuant(fx.Interpreter):
    """The graph as the engine will compute it, in float: each site's GEMMs reading its activation divided by its
    scales, with their weights multiplied by them (what folding does), every token-wise A8 GEMM but those in `keep` with
    fake-quantized per-token activations and planned weight groups. `weights` caches the fake-quantized
    weights across interpreters of the same graph and scales."""

    def __init__(self, gm: fx.GraphModule, sites: list[Site], scales: dict[str, Optional[torch.Tensor]],
                 keep: frozenset = frozenset(), weights: Optional[dict] = None):
        super().__init__(gm)
        self.mul = {g: scales[s.name] for s in sites if scales.get(s.name) is not None for g in s.gemms}
        self.keep = keep
        self.weights: dict = {} if weights is None else weights

    def _quantized(self, n: fx.Node) -> bool:
        return quantized_a8(n) and n not in self.keep

    def _weight(self, n: fx.Node, w: torch.Tensor) -> torch.Tensor:
        s = self.mul.get(n)
        key = (n, None if s is None else id(s), self._quantized(n))
        if key not in self.weights:
            wf = w.detach().float() if s is None else w.detach().float() * s
            self.weights[key] = fake_w(wf, n) if self._quantized(n) else wf
        return self.weights[key]

    def run_node(self, n: fx.Node):
        if n.op == "call_function" and n.target == aten.linear.default and (self._quantized(n) or n in self.mul):
            args, _ = self.fetch_args_kwargs_from_env(n)
            x, w, b = args[0], args[1], args[2] if len(args) > 2 else None
            s = self.mul.get(n)
            xf = x.float() if s is None else x.float() / s  # the division folded into the producer
            xf = fake_x(xf, n) if self._quantized(n) else xf
            y = torch.nn.functional.linear(xf, self._weight(n, w), None if b is None else b.float())
            return y.to(x.dtype)
        return super().run_node(n)


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


def fake_w(w: torch.Tensor, node: fx.Node) -> torch.Tensor:
    wq = node.meta["zq_gemm"].scheme.weight
    return qm.qdq_weight(w, wq.bits, wq.granularity, wq.num_groups, wq.group_size, wq.dtype == "fp8", torch.float32,
                         wq.group_scales == "two-level")


def fake_x(x: torch.Tensor, node: fx.Node) -> torch.Tensor:
    return qm.qdq_tokens(x.float(), node.meta["zq_gemm"].scheme.act.dtype == "fp8")


def _site_error(x: torch.Tensor, ws: list[tuple[torch.Tensor, fx.Node]], s: Optional[torch.Tensor]) -> float:
    """Relative squared error of the site's quantized GEMM outputs on the sampled rows, with scales s."""
    err = ref = 0.0
    xs = x if s is None else x / s
    for w, node in ws:
        xq = fake_x(xs, node)
        y = x @ w.t()
        wsc = w if s is None else w * s
        yq = xq @ fake_w(wsc, node).t()
        err += float((yq - y).pow(2).sum())
        ref += float(y.pow(2).sum())
    return err / max(ref, 1e-30)


def _scales(amax_x: torch.Tensor, amax_w: torch.Tensor, alpha: float) -> torch.Tensor:
    s = amax_x.clamp_min(1e-8).pow(alpha) / amax_w.clamp_min(1e-8).pow(1 - alpha)
    return s.clamp(*_S_RANGE)


def _model_error(gm: fx.GraphModule, sites: list[Site], scales: dict, data: list[tuple], refs: list) -> float:
    err = ref = 0.0
    fq = FakeQuant(gm, sites, scales)
    for inputs, y in zip(data, refs):
        yq = first_float(fq.run(*inputs)).float()
        err += float((yq - y).pow(2).sum())
        ref += float(y.pow(2).sum())
    return err / max(ref, 1e-30)


def compute_scales(gm: fx.GraphModule, ctx: PassContext, sites: list[Site]) -> dict[str, dict]:
    """{site: {"alpha", "s" (fp32 [K]) or None for no scales, "error": (before, after) of the site's quantized
    GEMMs, "data": what calibrated it, "search": how alpha was chosen}}."""
    fs = ctx.config.feature_scales
    data, note = calibration_batches(gm, ctx)
    rec = _Recorder(gm, sites, fs.max_tokens)
    refs, used, tokens = [], [], 0
    with torch.no_grad():
        for inputs in data:
            out = first_float(rec.run(*inputs))
            if fs.alpha is None and fs.search == "model" and out is not None and tokens < fs.max_tokens:
                refs.append(out.detach().float())
                used.append(inputs)
                tokens += out.numel() // out.shape[-1]
    per_site = {}
    for site in sites:
        x = torch.cat(rec.rows[site.name]).float()
        ws = [(get_tensor(gm, arg(g, "weight")).detach().float(), g) for g in site.gemms if quantized_a8(g)]
        amax_w = torch.stack([w.abs().amax(dim=0) for w, _ in ws]).amax(dim=0)
        cands = {a: _scales(rec.amax[site.name], amax_w, a) for a in ((fs.alpha,) if fs.alpha is not None else fs.alphas)}
        per_site[site.name] = (x, ws, cands, _site_error(x, ws, None))

    def result(site: str, alpha, how: str) -> dict:
        x, ws, cands, base = per_site[site]
        s = None if alpha is None else cands[alpha]
        return {"alpha": alpha, "s": s, "error": (base, base if s is None else _site_error(x, ws, s)), "data": note,
                "search": how}

    if fs.alpha is not None:
        return {name: result(name, fs.alpha, "given") for name in per_site}
    if fs.search == "site" or not refs:
        out = {}
        for name, (x, ws, cands, base) in per_site.items():
            errs = {a: _site_error(x, ws, s) for a, s in cands.items()}
            best = min(errs, key=errs.get)
            out[name] = result(name, best if errs[best] < base else None, "least error of the site's GEMMs")
        return out
    with torch.no_grad():
        errs = {a: _model_error(gm, sites, {n: c[2][a] for n, c in per_site.items()}, used, refs) for a in fs.alphas}
        errs[None] = _model_error(gm, sites, {}, used, refs)
    best = min(errs, key=lambda a: errs[a])
    how = "model output error " + ", ".join(f"{'none' if a is None else f'{a:.2f}'}: {e:.2e}" for a, e in errs.items())
    return {name: result(name, best, how) for name in per_site}
