"""Module-level fake quantization: an nn.Module model whose quantized GEMMs compute in float with the
engine's quantizers applied (quantize -> dequantize, formulas from `ops.quant_math`).

It is the student of LKD (rounding uses a straight-through estimator, so it trains) and an accuracy path
independent of the compiled graph. Every nn.Linear / HF Conv1D whose scheme (`resolve_scheme` with
`classify_role` on its FQN) is quantized is replaced by a `FakeQuantLinear` wrapping the original module
(the wrapped module keeps the fp parameters: training the wrapper trains them). Static per-tensor
activations need a calibrated range: run `calibrate_static` on sample batches before use.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from zqcompile.config import (ConfigError, GemmScheme, QuantConfig, as_scheme, classify_role, get_config,
                              resolve_scheme, weight_groups_error)
from zqcompile.experts import is_stacked_experts
from zqcompile.ops import quant_math as qm

try:  # HF GPT-2 style Conv1D: weight [K, N] (in, out), y = x @ W + b
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep fakequant importable
    Conv1D = ()  # type: ignore[assignment]


def _ste(x: torch.Tensor, x_qdq: torch.Tensor) -> torch.Tensor:
    """Forward x_qdq, backward identity: rounding has no useful gradient (straight-through estimator)."""
    return x + (x_qdq - x).detach()


def fake_quant_weight(w_nk: torch.Tensor, scheme: GemmScheme) -> torch.Tensor:
    """W [N, K] -> dequantize(quantize(W)) with the engine's scales; differentiable through the STE."""
    wq = scheme.weight
    return _ste(w_nk, qm.qdq_weight(w_nk, wq.bits, wq.granularity, wq.num_groups, wq.group_size, wq.dtype == "fp8",
                                    w_nk.dtype, wq.group_scales == "two-level"))


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def clip_shape(shape: tuple[int, int], scheme: GemmScheme) -> tuple[int, int]:
    """Shape of one learned clipping factor per weight scale group: [N, K // group_k], [num_groups, 1] for
    row groups of several rows, [1, 1] per tensor (a factor shared by the rows of a group keeps it bakeable)."""
    wq = scheme.weight
    n, k = shape
    gk = qm.check_weight_groups(shape, wq.bits, wq.granularity, wq.num_groups, wq.group_size)
    if wq.granularity == "tensor":
        return (1, 1)
    if wq.granularity == "row_groups":
        return (n if wq.num_groups is None else wq.num_groups, 1)
    return (n, k // gk)


def clipped_limit(w_nk: torch.Tensor, scheme: GemmScheme, clip: torch.Tensor) -> torch.Tensor:
    """The largest |value| each group keeps, clip * max|w_group|, as [N, K // group_k] (no gradient to w)."""
    wq = scheme.weight
    base = qm.weight_scales(w_nk.detach(), wq.bits, wq.granularity, wq.num_groups, wq.group_size) * qm.QMAX[wq.bits]
    c = clip.float()
    if c.shape[0] not in (1, base.shape[0]):  # row groups: one factor per group of rows
        c = c.repeat_interleave(base.shape[0] // c.shape[0], dim=0)
    return base * c


def fake_quant_weight_clipped(w_nk: torch.Tensor, scheme: GemmScheme, clip: torch.Tensor) -> torch.Tensor:
    """qdq(W) on the scales clip * max|w_group| / qmax (OmniQuant's learnable weight clipping, symmetric):
    rounding straight-through, so both W and the clipping factors train (the scale's gradient is LSQ's).
    It equals the engine's qdq of W clamped to +-clip * max|w_group| (`bake_clipping`)."""
    wq = scheme.weight
    scale = clipped_limit(w_nk, scheme, clip) / qm.QMAX[wq.bits]
    s = scale.repeat_interleave(w_nk.shape[1] // scale.shape[1], dim=1)
    q = _round_ste(w_nk.float() / s).clamp(-qm.QMAX[wq.bits], qm.QMAX[wq.bits])
    return (q * s).to(w_nk.dtype)


def fake_quant_tokens(x: torch.Tensor, fp8: bool = False) -> torch.Tensor:
    """Per-token INT8 (or FP8 E4M3) quantize -> dequantize, straight-through."""
    return _ste(x, qm.qdq_tokens(x, fp8))


def fake_quant_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q, s = qm.quantize_per_tensor(x, scale)
    return _ste(x, qm.dequantize_rows(q, s, x.dtype))


class FakeQuantLinear(nn.Module):
    """A quantized GEMM in float: y = fq(x) @ fq(W)^T + b. Wraps (does not copy) the original module."""

    def __init__(self, inner: nn.Module, scheme: GemmScheme, fqn: str):
        super().__init__()
        self.inner = inner
        self.scheme = scheme
        self.fqn = fqn
        self.observing = False  # static activations: record max|x| instead of quantizing
        self.register_buffer("act_amax", torch.zeros(()), persistent=False)
        self.register_buffer("act_scale", torch.full((), float("nan")), persistent=False)
        self._w_cache: tuple[tuple, torch.Tensor] | None = None
        self.clip: nn.Parameter | None = None  # learned clipping factors in (0, 1] (LKD), see learn_clipping

    def learn_clipping(self) -> nn.Parameter:
        """Add one trainable clipping factor per weight scale group, starting at 1 (the engine's max scales)."""
        wq = self.scheme.weight
        if wq.dtype == "fp8":
            raise ConfigError(f"{self.fqn}: learned weight clipping covers INT weights, not FP8")
        w = self.weight_nk()
        self.clip = nn.Parameter(torch.ones(clip_shape(tuple(w.shape), self.scheme), device=w.device))
        return self.clip

    @torch.no_grad()
    def bake_clipping(self) -> None:
        """Clamp the fp weight to +-clip * max|w_group|: the engine's max-based scales then equal the learned
        ones, so the compiled GEMM rounds as the trained student did. Drops the clipping parameter."""
        if self.clip is None:
            return
        w = self.weight_nk()
        lim = clipped_limit(w, self.scheme, self.clip.clamp(max=1.0))
        lim = lim.repeat_interleave(w.shape[1] // lim.shape[1], dim=1).to(w.dtype)
        w.copy_(torch.minimum(torch.maximum(w, -lim), lim))
        self.clip, self._w_cache = None, None

    def weight_nk(self) -> torch.Tensor:
        w = self.inner.weight
        return w.t() if isinstance(self.inner, Conv1D) else w

    def _weight(self) -> torch.Tensor:
        w = self.inner.weight
        if self.clip is not None:
            return fake_quant_weight_clipped(self.weight_nk(), self.scheme, self.clip)
        if torch.is_grad_enabled() and w.requires_grad:
            return fake_quant_weight(self.weight_nk(), self.scheme)
        # Inference: the quantized weight only changes when the fp weight does.
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._w_cache is None or self._w_cache[0] != key:
            with torch.no_grad():
                self._w_cache = (key, fake_quant_weight(self.weight_nk(), self.scheme))
        return self._w_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.scheme.act.mode
        if mode == "tensor":
            if self.observing:
                self.act_amax = torch.maximum(self.act_amax, x.detach().abs().amax().float().to(self.act_amax.device))
            elif torch.isnan(self.act_scale):
                raise RuntimeError(f"{self.fqn}: static per-tensor activations are not calibrated; "
                                   "run zqcompile.accuracy.fakequant.calibrate_static(model, batches) first")
            else:
                x = fake_quant_tensor(x, self.act_scale)
        elif mode == "token":
            x = fake_quant_tokens(x, self.scheme.act.dtype == "fp8")
        bias = self.inner.bias
        return nn.functional.linear(x, self._weight(), bias)

    def extra_repr(self) -> str:
        return f"{self.fqn}: {self.scheme.describe()}"


def is_gemm_module(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (bool(Conv1D) and isinstance(m, Conv1D))


def fake_quantize(model: nn.Module, config: QuantConfig | str, prefix: str = "") -> nn.Module:
    """Replace (in place) every quantized GEMM of `model` by a FakeQuantLinear; returns `model`.

    `prefix` is the FQN of `model` inside a larger model (LKD fake-quantizes one block but resolves
    schemes with the block's full names, e.g. "model.layers.3")."""
    config = get_config(config)
    _refuse_stacked_experts(model, config, prefix)
    for fqn, module, ancestors in list(_gemms(model, prefix)):
        types = [type(module), *(type(a) for a in ancestors)]
        scheme, _rule = resolve_scheme(config, fqn, classify_role(fqn), types)
        if scheme.is_float:
            continue
        shape = tuple(FakeQuantLinear(module, scheme, fqn).weight_nk().shape)
        try:  # shape errors (groups not fitting the weight) surface here, named, not mid-forward
            wq = scheme.weight
            qm.check_weight_groups(shape, wq.bits, wq.granularity, wq.num_groups, wq.group_size)
        except ValueError as e:
            raise weight_groups_error(fqn, shape, wq, str(e)) from None
        parent_name, _, child = fqn[len(prefix) + 1 if prefix else 0:].rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FakeQuantLinear(module, scheme, fqn))
    return model


def _refuse_stacked_experts(model: nn.Module, config: QuantConfig, prefix: str) -> None:
    """Mixture-of-experts weights stacked in 3-D parameters are no nn.Linear: fake quantization would leave them
    in float without a word. The engine quantizes them (zqcompile/experts.py); this path refuses them."""
    schemes = [config.default, *config.roles.values(), *(as_scheme(v) for _, v in config.overrides)]
    if all(s.is_float for s in schemes):
        return
    for name, m in model.named_modules():
        if is_stacked_experts(m):
            fqn = f"{prefix}.{name}" if prefix and name else prefix or name
            raise ConfigError(f"fake quantization (LKD, eval --path fakequant) covers nn.Linear / Conv1D GEMMs only: "
                              f"the stacked experts of {fqn!r} ({type(m).__name__}) would stay float; measure this "
                              f"model through the engine (eval --path engine) and compile it without lkd")


def _gemms(model: nn.Module, prefix: str, ancestors: tuple = ()) -> Iterable[tuple[str, nn.Module, tuple]]:
    for name, child in model.named_children():
        fqn = f"{prefix}.{name}" if prefix else name
        if isinstance(child, FakeQuantLinear):
            continue
        if is_gemm_module(child):
            yield fqn, child, (model, *ancestors)
        else:
            yield from _gemms(child, fqn, (model, *ancestors))


def fake_quant_modules(model: nn.Module) -> list[FakeQuantLinear]:
    return [m for m in model.modules() if isinstance(m, FakeQuantLinear)]


def remove_fake_quant(model: nn.Module) -> nn.Module:
    """Put the original modules back (in place); the fp weights are whatever training left in them, clamped
    to the learned clipping where there is one (`FakeQuantLinear.bake_clipping`)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, FakeQuantLinear):
            m.bake_clipping()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, m.inner)
    return model


@torch.no_grad()
def calibrate_static(model: nn.Module, batches: Sequence[torch.Tensor],
                     forward: Callable[[torch.Tensor], object] | None = None) -> int:
    """Set each static per-tensor activation scale from max|x| over `batches` (the ptq-static baseline).
    Returns the number of GEMMs calibrated."""
    mods = [m for m in fake_quant_modules(model) if m.scheme.act.mode == "tensor"]
    if not mods:
        return 0
    for m in mods:
        m.observing, m.act_amax = True, torch.zeros((), device=m.act_amax.device)
    try:
        for b in batches:
            (forward or model)(b)
    finally:
        for m in mods:
            m.observing = False
    for m in mods:
        m.act_scale = torch.tensor(qm.calibrated_scale(float(m.act_amax)), device=m.act_amax.device)
    return len(mods)
