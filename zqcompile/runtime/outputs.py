"""The structure of a model's output, kept as plain data so an engine file never needs the user's output types
registered with pytree to load.

torch.export stores a program's output structure as a pytree spec that names its node types; deserializing it
needs every type registered first (a fresh process that imported only zqcompile has not registered Hugging
Face's `ModelOutput` classes). So the engine's graph returns a flat tuple of tensors, and `OutputStructure`
(JSON in the engine file's metadata) rebuilds the user's type at call time: importing its module (which
registers it) when it can, else a plain dict / tuple with one warning.
"""
from __future__ import annotations

import importlib
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch.utils._pytree as pytree
from torch import fx

_BUILTIN = {"tuple": tuple, "list": list, "dict": dict, "None": type(None), "OrderedDict": OrderedDict}
_BUILTIN_NAMES = {v: k for k, v in _BUILTIN.items()}


def _children(spec: pytree.TreeSpec) -> list[pytree.TreeSpec]:
    return list(spec.children()) if hasattr(spec, "children") else list(spec.children_specs)


def _type_name(t: type) -> str:
    return _BUILTIN_NAMES.get(t) or f"{t.__module__}:{t.__qualname__}"


def _encode(spec: pytree.TreeSpec) -> dict:
    if spec.is_leaf():
        return {"leaf": True}
    ctx = spec.context
    if isinstance(ctx, type):  # namedtuple: the context is the class itself
        return {"type": _type_name(ctx), "namedtuple": True, "children": [_encode(c) for c in _children(spec)]}
    if ctx is not None and not (isinstance(ctx, (list, tuple)) and all(isinstance(k, (str, int)) for k in ctx)):
        ctx = None  # not representable: rebuilt as a tuple (see rebuild)
    return {"type": _type_name(spec.type), "context": list(ctx) if ctx is not None else None,
            "children": [_encode(c) for c in _children(spec)]}


def _import_type(name: str) -> type | None:
    if name in _BUILTIN:
        return _BUILTIN[name]
    module, _, qualname = name.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) else None


@dataclass(frozen=True)
class OutputStructure:
    """Plain-data pytree spec of the model's output (what `Engine.__call__` returns)."""

    tree: dict

    @staticmethod
    def of_spec(spec: pytree.TreeSpec) -> "OutputStructure":
        return OutputStructure(_encode(spec))

    @property
    def num_leaves(self) -> int:
        def count(node: dict) -> int:
            return 1 if node.get("leaf") else sum(count(c) for c in node["children"])
        return count(self.tree)

    def rebuild(self, leaves: tuple | list) -> Any:
        it = iter(leaves)
        out = self._build(self.tree, it)
        return out

    def _build(self, node: dict, it) -> Any:
        if node.get("leaf"):
            return next(it)
        values = [self._build(c, it) for c in node["children"]]
        t = _import_type(node["type"])
        if node.get("namedtuple"):
            return t(*values) if t is not None else self._fallback(node, values)
        if t is None or t not in pytree.SUPPORTED_NODES:
            return self._fallback(node, values)
        return pytree.SUPPORTED_NODES[t].unflatten_fn(values, node["context"])

    @staticmethod
    def _fallback(node: dict, values: list) -> Any:
        warnings.warn(f"the engine's output type {node['type']} cannot be imported in this process; returning "
                      f"its fields as a {'dict' if node.get('context') else 'tuple'}", stacklevel=4)
        ctx = node.get("context")
        return dict(zip(ctx, values)) if ctx else tuple(values)


def flatten_graph_outputs(gm: fx.GraphModule) -> OutputStructure:
    """Make `gm` (unlifted by capture.unlift, which keeps the program's output spec in gm.meta) take and return
    flat tensors: its code becomes plain fx code over its placeholders, its output the leaves as a tuple. Returns
    the structure that rebuilds what it returned before."""
    out_spec = gm.meta.pop("zq_out_spec", None)
    gm.graph.set_codegen(fx.graph.CodeGen())
    gm.recompile()
    if out_spec is None:  # already flat (a program this module wrote)
        n = len(next(iter(n for n in gm.graph.nodes if n.op == "output")).args[0])
        return OutputStructure({"type": "tuple", "context": None, "children": [{"leaf": True}] * n})
    return OutputStructure.of_spec(out_spec)
