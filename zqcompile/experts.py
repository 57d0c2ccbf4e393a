"""Mixture-of-experts blocks in a form torch.export captures and the pass pipeline quantizes per expert.

Hugging Face keeps each MoE layer's experts as stacked 3-D parameters (`gate_up_proj` [E, 2I, H], `down_proj`
[E, H, I]) behind an "experts implementation": the eager one loops over the experts that some token chose
(`nonzero`, a data-dependent loop torch.export cannot trace), "grouped_mm" sorts the tokens by expert and
runs one grouped GEMM over all experts (traceable, but a GEMM whose weight holds every expert, which no pass
of ours quantizes). While capturing, `dense_experts` selects the implementation below instead: a Python loop
over the experts, each one `F.linear` per projection on every token, its output weighted by the token's
routing weight for it (zero where the router did not choose it). Each expert's GEMMs are then ordinary GEMMs
with a constant weight (one slice of the stacked parameter, canonicalize_gemms) that quantize, fuse and
export like any other; the router stays a float GEMM (classify_gemms' "router" role).

The cost is compute: every expert runs on every token, num_experts / top_k times the routed work (4x for
Mixtral's 8 experts, 2 per token). The numbers are the eager implementation's: an expert the router did not
choose adds exactly zero.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from zqcompile.errors import CaptureError

DENSE = "zq_dense"


def is_stacked_experts(module: nn.Module) -> bool:
    """A stacked-experts module of transformers' `use_experts_implementation` (it sets these flags)."""
    return all(hasattr(module, a) for a in ("num_experts", "has_gate", "is_transposed", "down_proj")) and \
        hasattr(getattr(module, "config", None), "_experts_implementation")


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    return F.linear(x, weight.t() if transposed else weight, bias)


def dense_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """hidden_states [T, H], the router's choice top_k_index / top_k_weights [T, k] -> [T, H]."""
    if getattr(self, "_is_expert_parallel", False):
        raise CaptureError(f"{type(self).__name__}: expert-parallel experts cannot be captured; load the model "
                           f"on one device without expert parallelism")
    routing = torch.zeros((hidden_states.shape[0], self.num_experts), dtype=top_k_weights.dtype,
                          device=hidden_states.device).scatter(1, top_k_index, top_k_weights)
    out = torch.zeros_like(hidden_states)
    up = "gate_up_proj" if self.has_gate else "up_proj"
    up_weights, down_weights = getattr(self, up), self.down_proj
    up_bias, down_bias = (getattr(self, f"{up}_bias"), self.down_proj_bias) if self.has_bias else (None, None)
    for e in range(self.num_experts):
        h = _linear(hidden_states, up_weights[e], None if up_bias is None else up_bias[e], self.is_transposed)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        y = _linear(h, down_weights[e], None if down_bias is None else down_bias[e], self.is_transposed)
        if getattr(self, "has_post_expert_norm", False):  # transformers >= 5.18
            y = self.post_expert_norm(y)
        out = out + (y * routing[:, e, None]).to(out.dtype)
    return out


@contextlib.contextmanager
def dense_experts(module: nn.Module) -> Iterator[None]:
    """While capturing: every stacked-experts module under `module` runs dense_experts_forward; the configs'
    experts implementation is restored after, so the user's model is as it was."""
    experts = [m for m in module.modules() if is_stacked_experts(m)]
    if not experts:
        yield
        return
    from transformers.integrations.moe import ExpertsInterface
    ExpertsInterface.register(DENSE, dense_experts_forward)
    configs = {id(m.config): m.config for m in experts}
    before = {k: c._experts_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._experts_implementation = DENSE
        yield
    finally:
        for k, c in configs.items():
            c._experts_implementation = before[k]
