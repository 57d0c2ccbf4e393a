"""Constants derived from the model's weights, made once per compile and shared by every graph compiled
with the same context (the engine's full-sequence graph, and the prefill and decode graphs of generation).

A pass that derives a constant (GPT-2's transposed Conv1D weight, q/k/v concatenated, a weight quantized
group-wise) asks `SharedConstants.derive(fn, *args)`: the recipe is the transform (a module-level pure
function), its parameters and its source tensors (by identity: the three graphs are captured from one model,
so they read the same parameter objects), and a second graph asking for the same recipe gets the same tensor
objects back instead of quantizing again. Sharing is by construction, never by comparing values afterwards.

Because a recipe is data (fn, parameters, sources), a constant can be made again from other values of its
sources: a streamed compile (zqcompile/streaming.py) runs the passes on a skeleton whose parameters are fake
tensors, then `remake`s each constant from the weights it loads from disk, block by block.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class _Source:
    """A source tensor in a recipe, by identity (kept alive in SharedConstants._sources)."""

    id: int


@dataclass(frozen=True)
class _Made:
    """A tensor this memo made, by the recipe that made it (index: its place in a tuple result)."""

    key: tuple
    index: int | None


class SharedConstants:
    """Recipes are keyed structurally: a source tensor by identity (kept alive meanwhile, so its id() cannot be
    reused), a tensor this memo made by the recipe that made it. Made tensors are held weakly: a graph that
    keeps one keeps it alive for the next graph, and one that every graph dropped (q/k/v concatenated in FP16,
    quantized and then deleted) is freed at once instead of staying until the end of the compile -- at the
    Llama-3-8B shape those intermediates were 9 GB of the compile's peak. Asked for again, it is made again
    with the same key, so what was derived from it (the quantized weight) is still found."""

    def __init__(self) -> None:
        self._made: dict[tuple, Any] = {}  # key -> value, tensors in it as weak references
        self._derived: dict[int, _Made] = {}  # id(made tensor) -> how it was made, while the tensor lives
        self._sources: dict[int, torch.Tensor] = {}
        self.hits = 0

    def _key(self, recipe: tuple) -> tuple:
        out = []
        for part in recipe:
            if isinstance(part, torch.Tensor):
                made = self._derived.get(id(part))
                if made is not None:
                    out.append(made)
                else:
                    self._sources[id(part)] = part
                    out.append(_Source(id(part)))
            else:
                out.append(part)
        return tuple(out)

    def _hold(self, key: tuple, value: Any, index: int | None = None) -> Any:
        if isinstance(value, torch.Tensor):
            if id(value) in self._sources:  # make() returned a source as it is: nothing was derived
                return value
            self._derived[id(value)] = _Made(key, index)
            weakref.finalize(value, self._derived.pop, id(value), None)
            return weakref.ref(value)
        if isinstance(value, tuple):
            return tuple(self._hold(key, v, i) for i, v in enumerate(value))
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
        graph dropped what was made). A memo only: what `get` made cannot be remade (use `derive` for that)."""
        key = self._key(recipe)
        if key in self._made:
            alive, value = self._resolve(self._made[key])
            if alive:
                self.hits += 1
                return value
        value = make()
        self._made[key] = self._hold(key, value)
        return value

    def derive(self, fn: Callable[..., Any], *args) -> Any:
        """`fn(*args)`, made once per compile for the same fn and arguments (tensors by identity). `fn` is a
        module-level pure function of its arguments, so the recipe can be evaluated again (`remake`)."""
        return self.get((fn, *args), lambda: fn(*args))

    # ---- making a constant again from other values of its sources (streamed compiles) --------------------
    def recipe_of(self, t: torch.Tensor) -> _Made | None:
        """How `t` was derived (None: a source, or a tensor this memo did not make)."""
        return self._derived.get(id(t))

    def sources_of(self, made: _Made) -> list[torch.Tensor]:
        """The source tensors a derived constant is computed from, recursively."""
        out: dict[int, torch.Tensor] = {}

        def walk(key: tuple) -> None:
            for part in key[1:]:
                if isinstance(part, _Source):
                    out[part.id] = self._sources[part.id]
                elif isinstance(part, _Made):
                    walk(part.key)
        walk(made.key)
        return list(out.values())

    def remake(self, made: _Made, value_of: Callable[[torch.Tensor], torch.Tensor], memo: dict) -> Any:
        """Evaluate `made`'s recipe again with every source tensor s replaced by value_of(s); `memo` (the
        caller's, keyed by recipe) makes each intermediate (a concatenation) and each tuple (wq, scale) once."""
        key = made.key
        if key not in memo:
            fn = key[0]
            if not callable(fn):
                raise ValueError(f"constant made by {fn!r} through SharedConstants.get cannot be made again; "
                                 f"derive it with SharedConstants.derive")
            args = [value_of(self._sources[p.id]) if isinstance(p, _Source)
                    else self.remake(p, value_of, memo) if isinstance(p, _Made) else p for p in key[1:]]
            memo[key] = fn(*args)
        value = memo[key]
        return value if made.index is None else value[made.index]

    def release(self) -> None:
        """Forget the recipes (and the sources they kept alive) once every graph is compiled."""
        self._made.clear()
        self._derived.clear()
        self._sources.clear()
