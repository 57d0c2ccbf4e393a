"""fold_decomposed_ops: recognise ops that models write out by hand and give them back their one-op form,
so the fusion passes (and kernels) see them: Hugging Face's RMSNorm (pow -> mean -> add eps -> rsqrt -> mul
-> mul weight) becomes `aten.rms_norm`; GPT-2's tanh GeLU ("gelu_new", 0.5*x*(1+tanh(...))) becomes
`aten.gelu(approximate="tanh")`. Export's dtype asserts and same-dtype casts are dropped first.
"""
from __future__ import annotations

import math

from torch import fx

from zqcompile.passes.base import PassContext, PassResult, aten, copy_meta, dtype_of, get_tensor, is_call

_TO = (aten.to.dtype, aten._to_copy.default)


def _drop_asserts_and_noop_casts(gm: fx.GraphModule) -> int:
    n = 0
    for node in list(gm.graph.nodes):
        if is_call(node, aten._assert_tensor_metadata.default):
            gm.graph.erase_node(node)
            n += 1
        elif (is_call(node, aten.to.dtype) and len(node.args) >= 2 and isinstance(node.args[0], fx.Node)
              and dtype_of(node.args[0], None) == node.args[1]) and not node.kwargs:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            n += 1
    return n


def _num(x, value: float, tol: float = 1e-6) -> bool:
    return isinstance(x, (int, float)) and abs(x - value) <= tol * max(1.0, abs(value))


def _split(node: fx.Node, pred):
    """For a binary call, return (arg matching pred, the other) or None."""
    a, b = node.args[:2]
    if pred(a):
        return a, b
    if pred(b):
        return b, a
    return None


def _strip_cast(n):
    return n.args[0] if is_call(n, *_TO) else n


def _match_rms(gm: fx.GraphModule, node: fx.Node):
    if not is_call(node, aten.mul.Tensor):
        return None
    split = _split(node, lambda a: get_tensor(gm, a) is not None and get_tensor(gm, a).dim() == 1)
    if split is None:
        return None
    weight, y = split
    y = _strip_cast(y)
    if not is_call(y, aten.mul.Tensor):
        return None
    split = _split(y, lambda a: is_call(a, aten.rsqrt.default))
    if split is None:
        return None
    rsqrt, x = split
    add = rsqrt.args[0]
    if not (is_call(add, aten.add.Tensor) and isinstance(add.args[1], (int, float))):
        return None
    mean = add.args[0]
    if not (is_call(mean, aten.mean.dim) and list(mean.args[1]) == [-1] and (len(mean.args) > 2 and mean.args[2])):
        return None
    pw = mean.args[0]
    if not (is_call(pw, aten.pow.Tensor_Scalar) and _num(pw.args[1], 2) and pw.args[0] is x):
        return None
    return _strip_cast(x), weight, float(add.args[1])


def _match_tanh_gelu(node: fx.Node):
    if not is_call(node, aten.mul.Tensor):
        return None
    split = _split(node, lambda a: is_call(a, aten.mul.Tensor) and _num(a.args[1], 0.5))
    if split is None:
        return None
    half, one_plus = split
    x = half.args[0]
    if not (is_call(one_plus, aten.add.Tensor) and _num(one_plus.args[1], 1.0) and is_call(one_plus.args[0], aten.tanh.default)):
        return None
    inner = one_plus.args[0].args[0]
    if not (is_call(inner, aten.mul.Tensor) and _num(inner.args[1], math.sqrt(2 / math.pi), 1e-5)):
        return None
    s = inner.args[0]
    if not (is_call(s, aten.add.Tensor) and s.args[0] is x and is_call(s.args[1], aten.mul.Tensor)
            and _num(s.args[1].args[1], 0.044715) and is_call(s.args[1].args[0], aten.pow.Tensor_Scalar)
            and s.args[1].args[0].args[0] is x and _num(s.args[1].args[0].args[1], 3)):
        return None
    return x


def fold_decomposed_ops(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    dropped = _drop_asserts_and_noop_casts(gm)
    rms = gelu = 0
    for node in list(gm.graph.nodes):
        m = _match_rms(gm, node)
        if m is not None:
            x, weight, eps = m
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(aten.rms_norm.default, (x, [get_tensor(gm, weight).shape[0]], weight, eps))
            rms += 1
        else:
            x = _match_tanh_gelu(node)
            if x is None:
                continue
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(aten.gelu.default, (x,), {"approximate": "tanh"})
            gelu += 1
        copy_meta(new, node)
        new.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(new)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    notes = [f"{rms} RMSNorm, {gelu} tanh-GeLU folded", f"{dropped} export asserts / no-op casts dropped"]
    return PassResult(gm, bool(rms or gelu or dropped), rms + gelu, rms + gelu, notes)
