"""Constants derived from the model's weights, made once per compile and shared by every graph compiled
with the same context (the engine's full-sequence graph, and the prefill and decode graphs of generation).

A pass that derives a constant (GPT-2's transposed Conv1D weight, q/k/v concatenated, a weight quantized
group-wise) asks `SharedConstants.get(recipe, make)`: the recipe names the transform, its parameters and its
source tensors (by identity: the three graphs are captured from one model, so they read the same parameter
objects), and a second graph asking for the same recipe gets the same tensor objects back instead of
quantizing again. Sharing is by construction, never by comparing values afterwards.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


class SharedConstants:
    def __init__(self) -> None:
        self._made: dict[tuple, Any] = {}
        self._sources: dict[int, torch.Tensor] = {}  # holds each source so its id() cannot be reused meanwhile
        self.hits = 0

    def _key(self, recipe: tuple) -> tuple:
        out = []
        for part in recipe:
            if isinstance(part, torch.Tensor):
                self._sources[id(part)] = part
                out.append(("tensor", id(part)))
            else:
                out.append(part)
        return tuple(out)

    def get(self, recipe: tuple, make: Callable[[], Any]) -> Any:
        """The constant(s) `make()` returns for `recipe`, made on the first request only."""
        key = self._key(recipe)
        if key in self._made:
            self.hits += 1
        else:
            self._made[key] = make()
        return self._made[key]

    def release(self) -> None:
        """Forget the recipes (and the sources they kept alive) once every graph is compiled."""
        self._made.clear()
        self._sources.clear()
