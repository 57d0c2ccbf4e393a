"""The names a Hugging Face checkpoint gives a model's tensors, which are not always the model's own: transformers
5 keeps a mixture-of-experts layer's experts as stacked 3-D parameters (`mlp.experts.gate_up_proj` [E, 2I, H])
but saves and loads them as one Linear layer per expert and projection (Mixtral's
`block_sparse_moe.experts.3.w1`, Qwen-MoE's `mlp.experts.3.gate_proj`), and renames some modules on the way
(its conversion mapping, `transformers.conversion_mapping`). A compressed-tensors checkpoint quantizes Linear
layers, so the experts must be written in the per-expert form, under the names vLLM and transformers read.

Nothing here is hand-written per family: transformers' own save-time conversion (`revert_weight_conversion`) is
run on row indices in place of the weights, which says which rows of which expert each checkpoint layer holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zqcompile.errors import ExportError
from zqcompile.experts import is_stacked_experts


@dataclass(frozen=True)
class ExpertLinear:
    """A checkpoint Linear layer that holds rows [r0, r1) of one expert's projection (the engine GEMM part
    `part`, e.g. 'model.layers.0.mlp.experts.3.gate_up_proj')."""

    name: str  # e.g. 'model.layers.0.block_sparse_moe.experts.3.w1'
    part: str
    r0: int
    r1: int


def _revert(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from transformers.core_model_loading import revert_weight_conversion
    return revert_weight_conversion(model, tensors)


def _rows_of(model: nn.Module, fqn: str, leaf: str, stacked: torch.Tensor) -> list[ExpertLinear]:
    num, rows = stacked.shape[:2]
    index = torch.arange(num * rows, dtype=torch.float64).reshape(num, rows, 1)  # exact integers, one per row
    out = []
    for name, t in _revert(model, {f"{fqn}.{leaf}": index}).items():
        got = t.reshape(-1).long()
        e, r0 = divmod(int(got[0]), rows)
        if not name.endswith(".weight") or t.dim() != 2 or \
                not torch.equal(got, torch.arange(e * rows + r0, e * rows + r0 + got.numel())) or r0 + got.numel() > rows:
            raise ExportError(f"cannot export the experts of {fqn} to compressed-tensors: transformers saves "
                              f"{fqn}.{leaf} as {name} {tuple(t.shape)}, not as whole rows of one expert's Linear "
                              f"layer; keep the experts in floating point (config.with_overrides({{{fqn + '.'!r}: "
                              f"'fp'}})) and export to ONNX instead")
        out.append(ExpertLinear(name.removesuffix(".weight"), f"{fqn}.{e}.{leaf}", r0, r0 + got.numel()))
    return out


def expert_linears(model: nn.Module) -> list[ExpertLinear]:
    """Every checkpoint Linear layer behind the model's stacked experts, in the checkpoint's names."""
    out = []
    for fqn, mod in model.named_modules():
        if not is_stacked_experts(mod):
            continue
        if mod.is_transposed:
            raise ExportError(f"cannot export the experts of {fqn} to compressed-tensors: {type(mod).__name__} "
                              f"stores them transposed ([E, in, out]); keep them in floating point "
                              f"(config.with_overrides({{{fqn + '.'!r}: 'fp'}})) and export to ONNX instead")
        for leaf in ("gate_up_proj", "up_proj", "down_proj"):
            stacked = getattr(mod, leaf, None)
            if isinstance(stacked, torch.Tensor) and stacked.dim() == 3:
                out += _rows_of(model, fqn, leaf, stacked)
    return out


def stacked_parameters(model: nn.Module) -> set[str]:
    """The model's parameter names that the checkpoint holds as per-expert layers instead."""
    return {f"{fqn}.{leaf}" for fqn, mod in model.named_modules() if is_stacked_experts(mod)
            for leaf in ("gate_up_proj", "up_proj", "down_proj")
            if isinstance(getattr(mod, leaf, None), torch.Tensor)}


def checkpoint_name(model: nn.Module, name: str) -> str:
    """The name transformers saves the model's tensor `name` under (its renamings; e.g. Mixtral's `.mlp.` ->
    `.block_sparse_moe.`), for a tensor its conversions do not split or merge."""
    (out,) = _revert(model, {name: torch.zeros(1)})
    return out


__all__ = ["ExpertLinear", "checkpoint_name", "expert_linears", "stacked_parameters"]
