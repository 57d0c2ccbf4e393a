"""canonicalize_gemms: bring every GEMM with a constant weight to one form, `aten.linear(x, W[N,K], b)`.

Matches: eval-mode `aten.dropout` (removed); `view(addmm(b, view(x, [-1, K]), W[K, N]), [..., N])` (GPT-2's
Conv1D) and `addmm`/`mm`/`matmul` with a constant [K, N] weight; `linear` whose weight is a view (select,
transpose) of a constant, such as one expert's slice of a stacked MoE parameter. Emits: `aten.linear` with a
(transposed / sliced) constant weight, so later passes handle a single GEMM op on a constant.
"""
from __future__ import annotations

import torch
from torch import fx

from zqcompile.passes.base import PassContext, PassResult, add_constant, aten, copy_meta, get_tensor, is_call, param_name, shape_of


def _drop_eval_dropout(gm: fx.GraphModule) -> int:
    n_removed = 0
    for node in list(gm.graph.nodes):
        if is_call(node, aten.dropout.default) and (len(node.args) < 3 or node.args[2] is False):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            n_removed += 1
    return n_removed


def transposed(w: torch.Tensor) -> torch.Tensor:
    """A Conv1D weight [K, N] as the [N, K] weight aten.linear reads."""
    return w.detach().t().contiguous()


def _to_linear(gm: fx.GraphModule, ctx: PassContext, node: fx.Node, x: fx.Node, w_node: fx.Node, bias) -> fx.Node:
    w = get_tensor(gm, w_node)
    w_t = ctx.constants.derive(transposed, w)
    wt = add_constant(gm, w_node.target + "_t", w_t, before=node)
    wt.meta["zq_param"] = param_name(w_node)  # errors about this weight name the user's parameter
    # A flattening view in front of the GEMM (GPT-2 Conv1D) is undone: linear takes N-D inputs, and later
    # passes need to see the real producer of x (LayerNorm, GeLU).
    out_view, in_view = None, None
    if is_call(x, aten.view.default, aten.reshape.default) and len(node.users) == 1:
        (user,) = node.users
        src_shape, out_shape = shape_of(x.args[0]), shape_of(user)
        if (is_call(user, aten.view.default, aten.reshape.default) and src_shape and out_shape
                and src_shape[:-1] == out_shape[:-1] and src_shape[-1] == w.shape[0]):
            in_view, x, out_view = x, x.args[0], user
    with gm.graph.inserting_before(node):
        lin = gm.graph.call_function(aten.linear.default, (x, wt, bias))
    copy_meta(lin, node)
    target = out_view if out_view is not None else node
    lin.meta["val"] = target.meta.get("val")
    target.replace_all_uses_with(lin)
    for dead in (out_view, node, in_view):
        if dead is not None and not dead.users:
            gm.graph.erase_node(dead)
    return lin


_VIEWS = (aten.select.int, aten.t.default, aten.transpose.int)


def _view_chain(gm: fx.GraphModule, w: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(the constant, the views from it to `w`, innermost first) when `w` is views of a constant, else None."""
    chain = []
    while is_call(w, *_VIEWS):
        chain.append(w)
        w = w.args[0]
    return (w, chain[::-1]) if chain and get_tensor(gm, w) is not None else None


def viewed(steps: tuple, src: torch.Tensor) -> torch.Tensor:
    """The views `steps` ((op, args), innermost first) of a constant, as a contiguous tensor of its own."""
    t = src.detach()
    for op, args in steps:
        t = op(t, *args)
    return t.clone(memory_format=torch.contiguous_format)


def _fold_constant_view(gm: fx.GraphModule, ctx: PassContext, gemm: fx.Node, base: fx.Node,
                        chain: list[fx.Node]) -> None:
    """The GEMM reads the view as a constant of its own, named after the stacked parameter it was sliced from
    (`meta["zq_stacked"]`: its path and the indices selected, which name the GEMM per expert)."""
    steps = tuple((v.target, tuple(v.args[1:])) for v in chain)
    w = ctx.constants.derive(viewed, steps, get_tensor(gm, base))
    param = param_name(base)
    indices = tuple(args[1] for op, args in steps if op == aten.select.int and args[0] == 0)
    wc = add_constant(gm, base.target + "".join(f"_{i}" for i in indices), w, before=gemm)
    wc.meta["zq_param"] = param + "".join(f"[{i}]" for i in indices)
    if indices:
        wc.meta["zq_stacked"] = (param, indices)
    gemm.replace_input_with(chain[-1], wc)
    for v in reversed(chain):
        if not v.users:
            gm.graph.erase_node(v)


def canonicalize_gemms(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    removed = _drop_eval_dropout(gm)
    matched = rewritten = 0
    for node in list(gm.graph.nodes):
        views = _view_chain(gm, node.args[1]) if is_call(node, aten.linear.default) else None
        if views is not None:
            matched += 1
            _fold_constant_view(gm, ctx, node, *views)
            rewritten += 1
        elif is_call(node, aten.addmm.default):
            bias, x, w = node.args[:3]
            if get_tensor(gm, w) is not None and get_tensor(gm, w).dim() == 2 and not node.kwargs:
                matched += 1
                _to_linear(gm, ctx, node, x, w, bias)
                rewritten += 1
        elif is_call(node, aten.mm.default, aten.matmul.default):
            x, w = node.args[:2]
            wt = get_tensor(gm, w)
            if wt is not None and wt.dim() == 2:
                matched += 1
                _to_linear(gm, ctx, node, x, w, None)
                rewritten += 1
    gm.graph.lint()
    notes = [f"removed {removed} eval-mode dropout(s)"] if removed else []
    return PassResult(gm, bool(removed or rewritten), matched, rewritten, notes)
