"""The constants an engine's graphs hold (quantized weights and scales, the float parameters left, the KV
cache), seen across all of its graphs at once: the engine, prefill and decode graphs share tensor objects by
construction (zqcompile.passes.constants), and everything here keeps it so: bytes are counted once per
tensor, a move to another device moves each tensor once and points every graph at the moved copy.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn


def module_tensors(module: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    """(owner, attribute, tensor) for every parameter and buffer of `module` and its submodules."""
    for owner in module.modules():
        for table in (owner._parameters, owner._buffers):
            for name, t in table.items():
                if t is not None:
                    yield owner, name, t


def unique_tensors(modules: Iterable[nn.Module]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for m in modules:
        for _, _, t in module_tensors(m):
            seen.setdefault(id(t), t)
    return list(seen.values())


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def move_constants(modules: Iterable[nn.Module], device: torch.device | str) -> None:
    """Move every parameter and buffer of `modules` to `device`, each shared tensor once, keeping it shared."""
    moved: dict[int, torch.Tensor] = {}
    old: list[torch.Tensor] = []  # alive until the end, so no id() is reused while `moved` is keyed by them
    for m in modules:
        for owner, name, t in list(module_tensors(m)):
            new = moved.get(id(t))
            if new is None:
                old.append(t)
                data = t.detach().to(device)
                new = nn.Parameter(data, requires_grad=False) if isinstance(t, nn.Parameter) else data
                moved[id(t)] = new
            if name in owner._parameters:
                owner._parameters[name] = new
            else:
                owner._buffers[name] = new
