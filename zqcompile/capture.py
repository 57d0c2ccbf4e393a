"""Capture: a PyTorch / Hugging Face model -> an ATen-level torch.fx GraphModule via torch.export (non-strict).

transformers 5.x has no `transformers.utils.fx` and plain symbolic tracing fails on its models, so we use
torch.export with dynamic batch and sequence axes. The model is wrapped so the graph takes the user's
inputs as positional tensors (bound to the forward's parameter names once, here) and fixed keyword
arguments (`use_cache=False`) are baked in. Graph nodes keep `nn_module_stack`, from which `fqn_of`
recovers the user's module names.
"""
from __future__ import annotations

import inspect
import linecache
import re
import traceback
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.export import Dim
from zqcompile.errors import CaptureError, InputError  # noqa: F401 - raised here, defined there

WRAPPER_PREFIX = "model."


class _Bound(nn.Module):
    """Calls `model(**dict(zip(names, args)), **fixed)` so torch.export sees positional tensors only."""

    def __init__(self, model: nn.Module, names: list[str], fixed: dict):
        super().__init__()
        self.model = model
        self.names = names
        self.fixed = fixed

    def forward(self, *args):
        return self.model(**dict(zip(self.names, args)), **self.fixed)


@dataclass
class InputSpec:
    """What the captured graph takes: names, dtypes and ranks of the positional tensors."""

    names: list[str]
    dtypes: list[torch.dtype]
    ranks: list[int]
    max_batch: int
    max_seq: int

    forward_params: list[str]  # the model's forward parameter names, in order (binds positional inputs)
    static_batch: int | None = None  # the only batch size the graph takes (config.dynamic_batch=False)
    static_seq: int | None = None  # the only sequence length (config.dynamic_seq=False)

    def bind(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        if len(args) > len(self.forward_params):
            raise InputError(f"got {len(args)} positional inputs; the model's forward takes {self.forward_params}")
        bound = dict(zip(self.forward_params, args))
        dup = set(bound) & set(kwargs)
        if dup:
            raise InputError(f"input(s) {sorted(dup)} given both positionally and by name")
        bound.update(kwargs)
        extra = [k for k in bound if k not in self.names]
        if extra:
            raise InputError(f"the engine was compiled for inputs {self.names}; got unexpected {extra}")
        missing = [k for k in self.names if k not in bound]
        if missing:
            raise InputError(f"missing input(s) {missing}; the engine takes {self.names}")
        tensors = [bound[n] for n in self.names]
        self.check(tensors)
        return tensors

    def check(self, tensors: list) -> None:
        for name, t, dt, rank in zip(self.names, tensors, self.dtypes, self.ranks):
            if not isinstance(t, torch.Tensor):
                raise InputError(f"input {name!r} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != dt:
                raise InputError(f"input {name!r} has dtype {t.dtype}; the engine was compiled for {dt}")
            if t.dim() != rank:
                raise InputError(f"input {name!r} has shape {tuple(t.shape)}; the engine expects {rank} dims")
            if rank >= 1 and self.static_batch is not None and t.shape[0] != self.static_batch:
                raise InputError(f"input {name!r}: batch {t.shape[0]}; the engine was compiled for batch "
                                 f"{self.static_batch} only (dynamic_batch=False)")
            if rank >= 2 and self.static_seq is not None and t.shape[1] != self.static_seq:
                raise InputError(f"input {name!r}: sequence length {t.shape[1]}; the engine was compiled for "
                                 f"length {self.static_seq} only (dynamic_seq=False)")
            if rank >= 1 and not 1 <= t.shape[0] <= self.max_batch:
                raise InputError(f"input {name!r}: batch {t.shape[0]} outside 1..{self.max_batch}")
            if rank >= 2 and not 1 <= t.shape[1] <= self.max_seq:
                raise InputError(f"input {name!r}: sequence length {t.shape[1]} outside 1..{self.max_seq}")
        shapes = {tuple(t.shape[:2]) for t in tensors if t.dim() >= 2}
        if len(shapes) > 1:
            raise InputError(f"inputs disagree on (batch, seq): {sorted(shapes)}")


def forward_signature(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def _fixed_kwargs(sig: inspect.Signature | None, bound: dict) -> dict:
    fixed = {}
    if sig is not None and "use_cache" in sig.parameters and "use_cache" not in bound:
        fixed["use_cache"] = False  # no KV-cache objects in the graph; generation has its own engine
    return fixed


def _widen(t: torch.Tensor, dynamic: tuple[bool, bool] = (True, True)) -> torch.Tensor:
    """torch.export specialises size-1 dims; capture on >= 2 so batch and sequence stay dynamic."""
    for dim in range(min(t.dim(), 2)):
        if dynamic[dim] and t.shape[dim] == 1:
            t = torch.cat([t, t], dim=dim)
    return t


def capture(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None,
            dynamic: tuple[bool, bool] = (True, True)) -> tuple[fx.GraphModule, InputSpec]:
    """Export `model(*example_inputs, **example_kwargs)`; returns the graph and its input spec (which binds
    call-time inputs the way the model's forward does)."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, (tuple, list)):
        raise InputError("example_inputs must be a tuple of tensors, e.g. (input_ids,)")
    kwargs = dict(example_kwargs or {})
    sig = forward_signature(model)
    try:
        bound = sig.bind_partial(*example_inputs, **kwargs).arguments if sig else {
            f"arg{i}": a for i, a in enumerate(example_inputs)}
    except TypeError as e:
        raise InputError(f"example inputs do not match {type(model).__name__}.forward: {e}") from None
    names, tensors = [], []
    for name, value in bound.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(f"example input {name!r} must be a torch.Tensor, got {type(value).__name__}")
        if 0 in value.shape:
            raise InputError(f"example input {name!r} has shape {tuple(value.shape)}, with a zero-size dimension; "
                             f"give at least one batch row and one token, e.g. shape (2, 16)")
        names.append(name)
        tensors.append(value)
    if not tensors:
        raise InputError("example_inputs is empty; pass at least (input_ids,)")
    max_seq = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 4096)
    max_batch = 1024
    for name, t in zip(names, tensors):
        if (dynamic[0] and t.dim() >= 1 and t.shape[0] > max_batch) or (t.dim() >= 2 and t.shape[1] > max_seq):
            raise InputError(f"example input {name!r} has shape {tuple(t.shape)}; batch must be <= {max_batch} and "
                             f"sequence length <= {max_seq} (the model's context length)")
    batch = Dim("batch", min=1, max=max_batch) if dynamic[0] else None
    seq = Dim("seq", min=1, max=max_seq) if dynamic[1] else None
    dyn = []
    widened = []
    for t in tensors:
        spec = {}
        if t.dim() >= 1 and batch is not None:
            spec[0] = batch
        if t.dim() >= 2 and seq is not None:
            spec[1] = seq
        dyn.append(spec)
        # a copy, never the caller's tensor: torch.export guards a view input on its base's shape
        widened.append(_widen(t, dynamic).clone(memory_format=torch.contiguous_format))
    wrapper = _Bound(model, names, _fixed_kwargs(sig, bound)).eval()
    try:
        ep = export_dynamic(wrapper, tuple(widened), (tuple(dyn),))
    except Exception as e:  # noqa: BLE001 - re-raised with the module that failed
        raise CaptureError(_describe_capture_failure(model, e)) from e
    gm = unlift(ep)
    params = [p.name for p in sig.parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)] if sig else names
    first = tensors[0]
    spec = InputSpec(names, [t.dtype for t in tensors], [t.dim() for t in tensors], max_batch, max_seq, params,
                     None if dynamic[0] or first.dim() < 1 else int(first.shape[0]),
                     None if dynamic[1] or first.dim() < 2 else int(first.shape[1]))
    return gm, spec


def unlift(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """The program as a GraphModule (parameters and buffers as attributes), its output structure kept in
    gm.meta["zq_out_spec"] for runtime/outputs.py."""
    gm = ep.module()
    gm.meta["zq_out_spec"] = ep.call_spec.out_spec
    return gm


def export_dynamic(module: nn.Module, args: tuple, dynamic_shapes) -> torch.export.ExportedProgram:
    """torch.export with named dynamic dims; when export cannot prove a guard it derived over them (seen on
    CUDA with SmolLM2's GQA shapes: min(64*seq, 192*seq) == 64*seq), retry with Dim.AUTO, which lets export
    keep the guard as a runtime check instead of failing."""
    # The traced op stays aten.scaled_dot_product_attention (the fused kernel is chosen at run time); forcing
    # the math backend while tracing only keeps CUDA's kernel-selection checks out of the shape guards.
    # Mixture-of-experts layers are captured in their dense form (zqcompile/experts.py).
    from torch.nn.attention import SDPBackend, sdpa_kernel
    mode = fake_mode_of(module.parameters())
    if mode is not None:  # a skeleton with fake parameters (zqcompile/streaming.py): trace in their mode
        args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
    from zqcompile.experts import dense_experts
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), dense_experts(module):
        try:
            return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as e:  # noqa: BLE001
            if "Constraints violated" not in str(e):
                raise
            return torch.export.export(module, args, dynamic_shapes=_auto(dynamic_shapes), strict=False)


def is_placeholder(t: object) -> bool:
    """A fake tensor: shape, dtype and device only (a streamed compile's skeleton weight and what passes derive
    from it, zqcompile/streaming.py); its values are made after the passes, from the weights on disk."""
    return isinstance(t, FakeTensor)


def fake_mode_of(tensors: Iterable[torch.Tensor]) -> FakeTensorMode | None:
    """The fake-tensor mode of the first placeholder among `tensors` (a streamed compile's skeleton), else None."""
    return next((t.fake_mode for t in tensors if is_placeholder(t)), None)


def _auto(spec):
    if isinstance(spec, dict):
        return {k: _auto(v) for k, v in spec.items()}
    if isinstance(spec, (tuple, list)):
        return type(spec)(_auto(v) for v in spec)
    if spec is None or spec is Dim.STATIC:
        return spec
    return Dim.AUTO


def _describe_capture_failure(model: nn.Module, err: Exception) -> str:
    """Name the innermost user module whose forward was running when capture failed, the line, and what
    would let torch.export trace it. Overrides act on the captured graph, so they cannot help here."""
    fqn_of_module = {id(m): (n or "<root>") for n, m in model.named_modules()}
    culprit = None
    for frame, lineno in traceback.walk_tb(err.__traceback__):
        obj = frame.f_locals.get("self")
        if isinstance(obj, nn.Module) and id(obj) in fqn_of_module:
            culprit = (fqn_of_module[id(obj)], type(obj).__name__, frame.f_code.co_filename, lineno)
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    where = f"in {type(model).__name__}"
    if culprit:
        code = linecache.getline(culprit[2], culprit[3]).strip()
        where = f"in module {culprit[0]!r} ({culprit[1]}) at {culprit[2]}:{culprit[3]}" + (f" `{code}`" if code else "")
    if type(err).__name__ == "GuardOnDataDependentSymNode" or "data-dependent" in text:
        fix = ("this is data-dependent Python control flow (an `if`, `int()`, `.item()` or `bool()` on a tensor's values): "
               "torch.export cannot branch on values; rewrite it with torch.where, or torch.cond for two branches")
    elif "ConstraintViolation" in type(err).__name__ or re.search(
            r"shape|size|dimension|out of range|not in range|Constraints violated", text, re.IGNORECASE):
        fix = ("this is a shape problem: check that the example inputs have the shapes the model expects (batch and sequence "
               ">= 1, within its context, masks matching input_ids); if they do, that module computes a shape that "
               "does not hold for every batch / sequence length (export traces them as symbols such as s0): derive "
               "it from the input's .shape instead")
    else:
        fix = "that construct must be changed so that torch.export (non-strict) can trace it"
    return f"torch.export could not capture the model {where}: {type(err).__name__}: {first} -- {fix}."


# ---- node -> user names ------------------------------------------------------------------------------------
def module_stack(node: fx.Node) -> list[tuple[str, object]]:
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, typ in stack.values():
        if path.startswith(WRAPPER_PREFIX):
            path = path[len(WRAPPER_PREFIX):]
        elif path == "model":
            path = ""
        out.append((path, typ))
    return out


def fqn_of(node: fx.Node) -> str:
    """The user's module FQN for a node (e.g. 'encoder.layer.3.intermediate.dense'), '' when unknown."""
    stack = module_stack(node)
    return stack[-1][0] if stack else ""


def param_fqn(target: str) -> str:
    return target[len(WRAPPER_PREFIX):] if target.startswith(WRAPPER_PREFIX) else target


def get_tensor(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The constant behind a get_attr node (None for anything else)."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj if isinstance(obj, torch.Tensor) else None
