"""Constants derived from the model's weights, made once per compile and shared by every graph compiled
with the same context (the engine's full-sequence graph, and the prefill and decode graphs of generation).

A pass that derives a constant (GPT-2's transposed Conv1D weight, q/k/v concatenated, a weight quantized
group-wise) asks `SharedConstants.get(recipe, make)`: the recipe names the transform, its parameters and its
source tensors (by identity: the three graphs are captured from one model, so they read the same parameter
objects), and a second graph asking for the same recipe gets the same tensor objects back instead of
quantizing again. Sharing is by construction, never by comparing values afterwards.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch


class SharedConstants:
    """Recipes are keyed structurally: a source tensor by identity (kept alive meanwhile, so its id() cannot be
    reused), a tensor this memo made by the recipe that made it. Made tensors are held weakly: a graph that
    keeps one keeps it alive for the next graph, and one that every graph dropped (q/k/v concatenated in FP16,
    quantized and then deleted) is freed at once instead of staying until the end of the compile -- at the
    Llama-3-8B shape those intermediates were 9 GB of the compile's peak. Asked for again, it is made again
    with the same key, so what was derived from it (the quantized weight) is still found."""

    def __init__(self) -> None:
        self._made: dict[tuple, Any] = {}  # key -> value, tensors in it as weak references
        self._derived: dict[int, tuple] = {}  # id(made tensor) -> its key, while the tensor lives
        self._sources: dict[int, torch.Tensor] = {}
        self.hits = 0

    def _key(self, recipe: tuple) -> tuple:
        out = []
        for part in recipe:
            if isinstance(part, torch.Tensor):
                made = self._derived.get(id(part))
                if made is not None:
                    out.append(("made", made))
                else:
                    self._sources[id(part)] = part
                    out.append(("tensor", id(part)))
            else:
                out.append(part)
        return tuple(out)

    def _hold(self, key: tuple, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if id(value) in self._sources:  # make() returned a source as it is: nothing was derived
                return value
            self._derived[id(value)] = key
            weakref.finalize(value, self._derived.pop, id(value), None)
            return weakref.ref(value)
        if isinstance(value, tuple):
            return tuple(self._hold(key, v) for v in value)
        return value

    @staticmethod
    def _resolve(held: Any) -> tuple[bool, Any]:
        if isinstance(held, weakref.ref):
            v = held()
            return v is not None, v
        if isinstance(held, tuple):
            parts = [SharedConstants._resolve(h) for h in held]
            return all(ok for ok, _ in parts), tuple(v for _, v in parts)
        return True, held

    def get(self, recipe: tuple, make: Callable[[], Any]) -> Any:
        """The constant(s) `make()` returns for `recipe`, made on the first request (and again only if every
        graph dropped what was made)."""
        key = self._key(recipe)
        if key in self._made:
            alive, value = self._resolve(self._made[key])
            if alive:
                self.hits += 1
                return value
        value = make()
        self._made[key] = self._hold(key, value)
        return value

    def release(self) -> None:
        """Forget the recipes (and the sources they kept alive) once every graph is compiled."""
        self._made.clear()
        self._derived.clear()
        self._sources.clear()
