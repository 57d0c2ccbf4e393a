"""Pass infrastructure shared by every pass: the result type, the compile context (config, per-GEMM plan,
fusion records) and small graph helpers (arguments read by schema name, graph order); the pattern matcher
every fusion uses is in passes/match.py.

A pass is `fn(gm, ctx) -> PassResult`; it mutates `gm` in place and says what it matched and rewrote.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable

import torch
from torch import fx

from zqcompile import ops  # noqa: F401 - registers the zq ops the passes emit
from zqcompile.capture import fqn_of, get_tensor, is_placeholder, module_stack, param_fqn
from zqcompile.config import ConfigWarning, GemmScheme, QuantConfig
from zqcompile.passes.constants import SharedConstants

aten = torch.ops.aten
zq = torch.ops.zq
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def warn_at_caller(message: str) -> None:
    """A ConfigWarning pointing at the first frame outside zqcompile (the user's zq.compile call), so the
    warning shows the line to fix; Python 3.12's skip_file_prefixes does this, 3.10 lacks it."""
    level, frame = 2, sys._getframe(1)
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, ConfigWarning, stacklevel=level)


@dataclass
class GemmInfo:
    """One GEMM of the model and the plan for it (stored in node.meta['zq_gemm'])."""

    fqn: str
    role: str
    scheme: GemmScheme
    rule: str
    shape: tuple[int, int] = (0, 0)  # (N, K)
    kernel: str = "aten.linear"  # the op that finally runs it
    parts: tuple[tuple[str, int], ...] = ()  # (module FQN, output rows) of each module it runs, in row order


@dataclass(frozen=True)
class StoredWeight:
    """A module's weight quantized elsewhere (a compressed-tensors checkpoint), in the engine's conventions:
    int values [N, K] in int8 (INT4 values unpacked), fp32 scales [N, K // group_k]."""

    values: torch.Tensor
    scale: torch.Tensor
    bits: int


@dataclass
class FusionRecord:
    kind: str  # e.g. "layernorm+quant", "gemm+dequant", "epilogue:gelu"
    fqn: str
    replaced: list[str]
    fused_op: str
    note: str = ""


@dataclass
class NotFused:
    candidate: str
    fqn: str
    reason: str


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    matched: int = 0
    rewritten: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class WeightShard:
    """A tensor-parallel rank's slice of a float GEMM weight (zqcompile/parallel): the rank's weight is
    full.narrow(dim, start, size); dim 0 (rows) for column-parallel GEMMs (q/k/v, gate/up), dim 1 (K) for
    row-parallel ones (o_proj, down_proj). Its groups are planned on `full` and it is quantized as the slice of
    the full weight's quantization (quant_math.quantize_weight_shard)."""

    full: torch.Tensor
    dim: int
    start: int
    size: int
    ranks: int


@dataclass
class PassContext:
    """What passes may read besides the graph: the config, calibration inputs, and the records they keep."""

    config: QuantConfig
    example_inputs: tuple = ()
    calibration_inputs: list[tuple] = field(default_factory=list)
    gemms: list[GemmInfo] = field(default_factory=list)
    fusions: list[FusionRecord] = field(default_factory=list)
    not_fused: list[NotFused] = field(default_factory=list)
    max_seq: int | None = None  # longest sequence the graph accepts (its seq dim's bound); None = unknown
    constants: SharedConstants = field(default_factory=SharedConstants)  # shared by the graphs of one compile
    warn: bool = True  # config warnings; off for the generation graphs of a compile (the engine graph warned)
    # module FQN -> its weight as a checkpoint stored it, quantized (compressed-tensors import): used as it is
    stored_weights: dict[str, "StoredWeight"] = field(default_factory=dict)
    calibrate_feature_scales: bool = True  # False: fold the scales the engine graph calibrated (generation graphs)
    weight_shards: dict[int, WeightShard] = field(default_factory=dict)  # id(rank's weight) -> its slice (TP)
    input_names: tuple[str, ...] = ()  # the forward's names of the graph's inputs, in order (when known)

    def shard_of(self, weight: torch.Tensor | None) -> WeightShard | None:
        return self.weight_shards.get(id(weight)) if weight is not None else None


# ---- helpers ----------------------------------------------------------------------------------------------
def is_call(node: object, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def calls(gm: fx.GraphModule, *targets) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_call(n, *targets)]


@lru_cache(maxsize=None)
def _params(op) -> dict[str, tuple[int, Any]]:
    return {a.name: (i, a) for i, a in enumerate(op._schema.arguments)}


def arg(node: fx.Node, name: str):
    """The argument `name` of an op call, by the op's schema (aten and zq ops alike): given positionally, by
    keyword, or the schema's default. arg(ln, "eps"), arg(gemm, "residual")."""
    params = _params(node.target)
    if name not in params:
        raise KeyError(f"{node.target} has no argument {name!r}: {node.target._schema}")
    i, a = params[name]
    if i < len(node.args) and not a.kwarg_only:
        return node.args[i]
    if name in node.kwargs:
        return node.kwargs[name]
    if a.has_default_value():
        return a.default_value
    raise KeyError(f"{node.format_node()} lacks its required argument {name!r}")


def set_arg(node: fx.Node, name: str, value) -> None:
    """Set an op call's argument `name` (by schema), where the call gives it, else as a keyword."""
    i, a = _params(node.target)[name]
    if i < len(node.args) and not a.kwarg_only:
        node.update_arg(i, value)
    else:
        node.update_kwarg(name, value)


def last_of(nodes: Iterable) -> fx.Node:
    """The latest of `nodes` (non-nodes ignored) in graph order. fx keeps nodes ordered as it inserts them
    (`a < b`: a comes first), as torch's own pattern matcher relies on: no per-match order dict."""
    return max(n for n in nodes if isinstance(n, fx.Node))


def gemm_fqn(node: fx.Node) -> str:
    """A GEMM's name in the plan ('q_proj+k_proj+v_proj' once merged), else its module FQN."""
    info = node.meta.get("zq_gemm")
    return info.fqn if info is not None else fqn_of(node)


ACTIVATION_OPS = {aten.gelu.default: "gelu", aten.relu.default: "relu", aten.silu.default: "silu"}


def act_of(node: fx.Node) -> str:
    """The quant_math activation name of an ACTIVATION_OPS call ("gelu_tanh" for gelu(approximate="tanh"))."""
    act = ACTIVATION_OPS[node.target]
    return "gelu_tanh" if act == "gelu" and arg(node, "approximate") == "tanh" else act


def val(node: fx.Node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def dtype_of(node: fx.Node, default: torch.dtype = torch.float32) -> torch.dtype:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else default


def shape_of(node: fx.Node):
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def param_name(node: fx.Node) -> str:
    """The user's parameter path behind a constant ('transformer.h.0.mlp.c_fc.weight'): the name recorded
    when a pass made the constant from a parameter (canonicalize's transposed Conv1D weights), else the
    get_attr target without the capture wrapper's prefix."""
    return node.meta.get("zq_param") or param_fqn(node.target)


def param_offset(node: fx.Node) -> float:
    """What a constant adds to its parameter (Gemma's norms hold 1 + weight): an export writes constant - offset."""
    return node.meta.get("zq_param_offset", 0.0)


def same_param(new: fx.Node, old: fx.Node) -> None:
    """`new` holds the parameter `old` held (transformed: folded, transposed); an export writes it under that name."""
    new.meta["zq_param"] = param_name(old)
    if param_offset(old):
        new.meta["zq_param_offset"] = param_offset(old)


def add_constant(gm: fx.GraphModule, name: str, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register `tensor` as a buffer of gm's root (unique name) and return a get_attr node for it."""
    base = "zq_" + name.replace(".", "_").replace("-", "_")
    attr, i = base, 1
    while hasattr(gm, attr):
        attr, i = f"{base}_{i}", i + 1
    gm.register_buffer(attr, tensor)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(attr)
    node.meta["val"] = tensor
    return node


def getitems(gm: fx.GraphModule, node: fx.Node, count: int) -> list[fx.Node]:
    import operator
    outs = []
    with gm.graph.inserting_after(node):
        for i in reversed(range(count)):
            outs.append(gm.graph.call_function(operator.getitem, (node, i)))
    outs.reverse()
    for o in outs:
        o.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    return outs


def copy_meta(dst: fx.Node, src: fx.Node) -> None:
    for key in ("nn_module_stack", "stack_trace", "zq_gemm"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


__all__ = ["ACTIVATION_OPS", "act_of", "GemmInfo", "StoredWeight", "FusionRecord", "NotFused", "PassResult",
           "PassContext", "aten", "zq", "is_call", "calls", "arg", "set_arg", "last_of", "gemm_fqn", "val", "dtype_of",
           "shape_of", "get_tensor", "is_placeholder", "param_name", "param_offset", "same_param", "add_constant",
           "getitems", "copy_meta", "fqn_of", "module_stack", "warn_at_caller"]


def delete_attr(gm: fx.GraphModule, target: str) -> bool:
    """Delete the parameter or buffer at `target` from gm (False when there is none)."""
    *path, name = target.split(".")
    owner = gm
    for p in path:
        owner = getattr(owner, p, None)
        if owner is None:
            return False
    for table in ("_parameters", "_buffers"):
        d = getattr(owner, table, {})
        if name in d:
            del d[name]
            return True
    return False



def drop_constant(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase a get_attr node nothing reads any more, and its tensor when no other node reads it, so a weight
    replaced by its quantized form is freed when it is replaced rather than at cleanup."""
    if node.op != "get_attr" or node.users:
        return
    target = node.target
    gm.graph.erase_node(node)
    if not any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        delete_attr(gm, target)
