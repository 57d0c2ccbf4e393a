"""The zq op registry: each quantized op is declared once, and every backend registers against that declaration.

`@declare` wraps `torch.library.custom_op`: the op's schema comes from the Python signature, the decorated
function is its reference implementation (plain torch, the spec every backend is tested against), and
`@<op>.register_fake` gives its fake implementation. The declaration also says how the op is shown and lowered:
its dump category, whether it is exported (ONNX / TensorRT must translate it; inside TensorRT either as one plugin
node or as standard ONNX ops) or runtime-only (the generation graphs' ops), and whether the CUDA backend has a
kernel for it or runs the reference on CUDA tensors.

Backends register by decorator at import time: `@cuda_kernel("norm_quant")` (zqcompile/plugins/cuda.py; bound
to the "cuda" dispatch key only when the compiled library loads) and `@onnx_translation("norm_quant",
dialect="standard")` (zqcompile/export/). The exporter's translation tables, the CUDA registration loop and the
dump's colours are read from here; tests/ops/test_registry.py walks the registry for missing pieces. This module
imports only torch: backends import it, never the reverse.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

NAMESPACE = "zq"
CATEGORIES = ("quant", "qdq", "fused", "attention", "collective")  # how graph dumps colour the op
CUDA_SUPPORT = ("kernel", "reference")  # "reference": no kernel expected, the reference runs on CUDA tensors
TENSORRT_LOWERINGS = ("plugin", "standard")  # one zq.trt plugin node, or the standard-ONNX translation
ONNX_DIALECTS = ("standard", "tensorrt")


@dataclass
class OpDecl:
    """One op: what `declare` was told, and the backends registered against it since."""

    qualname: str  # "zq::norm_quant"
    category: str
    cuda: str
    tensorrt: Optional[str]  # None: runtime-only, never exported
    reference: Callable
    custom_op: torch._library.custom_ops.CustomOpDef
    fake: Optional[Callable] = None
    cuda_kernel: Optional[Callable] = None
    translations: dict[str, Callable] = field(default_factory=dict)  # ONNX dialect -> translator
    # a runtime-only op: why no export takes it and what to do instead (the exporters' refusal says it)
    not_exported: str = ("the generation graphs' ops run on the engine's runtime and have no ONNX lowering; export "
                         "the engine (its forward graph)")

    @property
    def namespace(self) -> str:
        return self.qualname.split("::")[0]

    @property
    def name(self) -> str:
        return self.qualname.split("::")[1]

    @property
    def exported(self) -> bool:
        return self.tensorrt is not None

    @property
    def overload(self) -> torch._ops.OpOverload:
        """`torch.ops.zq.<name>.default`, the target fx graphs call."""
        return getattr(getattr(torch.ops, self.namespace), self.name).default

    def register_fake(self, fn: Callable) -> Callable:
        """The fake implementation (shapes and dtypes only, for torch.export and fake-tensor checks)."""
        self.custom_op.register_fake(fn)
        self.fake = fn
        return fn

    def translation(self, dialect: str) -> Optional[Callable]:
        """The ONNX translator of this op in `dialect`; inside TensorRT an op without a plugin keeps its standard
        translation (TensorRT builds those ONNX ops natively)."""
        if dialect == "tensorrt" and self.tensorrt == "standard":
            dialect = "standard"
        return self.translations.get(dialect)


_DECLS: dict[str, OpDecl] = {}


def _qualname(name: str) -> str:
    return name if "::" in name else f"{NAMESPACE}::{name}"


def declare(category: str, *, cuda: str, tensorrt: Optional[str] = None, runtime_only: bool = False,
            mutates: tuple[str, ...] = (), namespace: str = NAMESPACE,
            not_exported: Optional[str] = None) -> Callable[[Callable], OpDecl]:
    """Declare the op named like the decorated function, which is its reference implementation.

    category: one of CATEGORIES. cuda: "kernel" when zqcompile/plugins/cuda.py must provide a kernel, "reference"
    when the op runs its reference on CUDA (QDQ forms the passes fuse away). tensorrt: "plugin" or "standard" for
    an exported op; runtime_only=True (and no tensorrt) for an op that only the engine's runtime runs. mutates:
    the parameters the op writes in place (a runtime-only op's KV cache; torch.library's mutates_args).
    not_exported: for a runtime-only op outside the generation graphs, why an export refuses it and what to do."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown op category {category!r}; known: {CATEGORIES}")
    if cuda not in CUDA_SUPPORT:
        raise ValueError(f"cuda={cuda!r}: say 'kernel' or 'reference'")
    if runtime_only and tensorrt is not None:
        raise ValueError("a runtime-only op has no TensorRT lowering: leave tensorrt out")
    if not_exported is not None and not runtime_only:
        raise ValueError("not_exported= explains a runtime-only op's refusal: set runtime_only=True")
    if mutates and not runtime_only:
        raise ValueError("only a runtime-only op may write its inputs in place (exported graphs are functional)")
    if not runtime_only and tensorrt not in TENSORRT_LOWERINGS:
        raise ValueError(f"an exported op needs tensorrt= one of {TENSORRT_LOWERINGS} (or runtime_only=True)")

    def wrap(fn: Callable) -> OpDecl:
        qualname = f"{namespace}::{fn.__name__}"
        if qualname in _DECLS:
            raise ValueError(f"op {qualname} is already declared")
        custom = torch.library.custom_op(qualname, mutates_args=tuple(mutates))(fn)
        decl = OpDecl(qualname, category, cuda, tensorrt, fn, custom)
        if not_exported is not None:
            decl.not_exported = not_exported
        _DECLS[qualname] = decl
        return decl

    return wrap


def op(name: str) -> OpDecl:
    """The declaration of op `name` ("norm_quant" or "ns::name")."""
    try:
        return _DECLS[_qualname(name)]
    except KeyError:
        known = ", ".join(d.name for d in _DECLS.values())
        raise KeyError(f"no zq op {name!r} is declared (zqcompile/ops/library.py declares: {known})") from None


def declared(namespace: Optional[str] = NAMESPACE) -> list[OpDecl]:
    """Every declaration in `namespace` (None: all), in declaration order."""
    return [d for d in _DECLS.values() if namespace is None or d.namespace == namespace]


def lookup(target) -> Optional[OpDecl]:
    """The declaration of an fx node's target, None when it is no declared op (ATen ops, Python functions)."""
    if not isinstance(target, torch._ops.OpOverload):
        return None
    return _DECLS.get(target.name().split(".")[0])


def remove(name: str) -> None:
    """Forget a declaration (tests declaring throwaway ops); the torch op itself stays defined."""
    del _DECLS[_qualname(name)]


# ---- backends --------------------------------------------------------------------------------------------------
def cuda_kernel(name: str) -> Callable[[Callable], Callable]:
    """Record `fn` as the CUDA kernel of op `name`; zqcompile/plugins/cuda.register binds it when the library
    loads."""
    decl = op(name)
    if decl.cuda != "kernel":
        raise ValueError(f"{decl.qualname} is declared reference-only on CUDA (cuda='reference'); declare it with "
                         f"cuda='kernel' to register a kernel")

    def wrap(fn: Callable) -> Callable:
        decl.cuda_kernel = fn
        return fn

    return wrap


def onnx_translation(name: str, *, dialect: str) -> Callable[[Callable], Callable]:
    """Record `fn` (an onnxscript translator with the op's signature) as op `name`'s translation in `dialect`."""
    decl = op(name)
    if dialect not in ONNX_DIALECTS:
        raise ValueError(f"unknown ONNX dialect {dialect!r}; known: {ONNX_DIALECTS}")
    if not decl.exported:
        raise ValueError(f"{decl.qualname} is runtime-only: it has no ONNX lowering")
    if dialect == "tensorrt" and decl.tensorrt != "plugin":
        raise ValueError(f"{decl.qualname} is declared to lower to standard ONNX inside TensorRT "
                         f"(tensorrt='standard'): its standard translation serves both dialects")

    def wrap(fn: Callable) -> Callable:
        decl.translations[dialect] = fn
        return fn

    return wrap


def translation_table(dialect: str) -> dict[torch._ops.OpOverload, Callable]:
    """{op overload: translator} for torch.onnx's custom_translation_table; ops without one are left out (the
    exporter names them)."""
    table = {}
    for decl in declared(None):
        fn = decl.translation(dialect) if decl.exported else None
        if fn is not None:
            table[decl.overload] = fn
    return table
