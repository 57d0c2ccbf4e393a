"""simplify_attention_masks: an attention mask computed from tensor *shapes* only (Hugging Face builds one
even when the caller passes no attention_mask) is a constant pattern: all-visible, causal, or a windowed /
chunked variant of causal. Passing it to `scaled_dot_product_attention` as a tensor pushes the GPU onto the
slow "math" attention kernel (measured on an H200: 11.5 ms of a BERT-base batch-128 forward, against 1.7 ms
for the fused kernel eager uses), so the first two become `attn_mask=None` / `is_causal=True`.

Matches: `aten.scaled_dot_product_attention(q, k, v, mask)` whose mask depends on no input data (the graph
inputs reach it only through their sizes). The mask is evaluated at probe shapes (see `probe_shapes`);
all-visible at every probe -> no mask, causal at every probe -> `is_causal=True`; anything else (a sliding
window, a chunk, a probe that would cost too much or fails) is left alone: correct, only slower. A mask built
from a real attention_mask input is data, so it is never touched.
"""
from __future__ import annotations

import itertools
import math

import torch
from torch import fx

from zqcompile.passes.base import PassContext, PassResult, aten, calls, fqn_of, get_tensor

_SIZE_OPS = (aten.sym_size.int,)
_SMALL_PROBES = ((2, 5), (3, 9))  # (batch, seq)
# The long probe runs at batch 1 (when batch is dynamic): a [1, 1, L, L] mask; L = 8192 took ~1.8 s and
# ~250 MB on one CPU core for a Mistral sliding-window mask.
MAX_PROBE_SEQ = 8192


def _mask_arg(node: fx.Node):
    if len(node.args) > 3:
        return node.args[3]
    return node.kwargs.get("attn_mask")


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]  # graph (topological) order


def _shape_only(nodes: list[fx.Node]) -> bool:
    keep = set(nodes)
    for n in nodes:
        if n.op == "placeholder" and any(u in keep and not (u.op == "call_function" and u.target in _SIZE_OPS)
                                         for u in n.users):
            return False
        if n.op == "call_module":
            return False
    return True


def mask_constants(gm: fx.GraphModule, nodes: list[fx.Node]) -> list[int]:
    """|value| (rounded up) of every number the mask subgraph holds: scalar arguments (an int literal such as
    the 16 of `aten.sub(index, 16)`, floats, SymInt arithmetic) and the values and sizes of get_attr tensors."""
    out: list[int] = []

    def number(a) -> None:
        if isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a):
            out.append(math.ceil(abs(a)))

    for n in nodes:
        fx.node.map_aggregate((n.args, n.kwargs), number)
        t = get_tensor(gm, n)
        if t is not None and t.numel():
            finite = t.detach().flatten().double()
            finite = finite[torch.isfinite(finite)]
            if finite.numel():
                out.append(math.ceil(float(finite.abs().max())))
            out.extend(t.shape)
    return out


def probe_shapes(ctx: PassContext, example: torch.Tensor, constants: list[int]) -> list[tuple[int, int]] | None:
    """(batch, seq) shapes to evaluate a mask at, varying only the dims the graph keeps dynamic; None when the
    long probe would outgrow a (1, MAX_PROBE_SEQ) one. Sound for the masks transformers builds: tracing folds
    config ints (sliding_window, attention_chunk_size) into literals k, and those masks compare positions or
    their difference with k or floor-divide positions by k, so the pattern changes only where a position reaches
    k or k + 1; max(k) + 2 tokens (k < max_seq: larger are never reached; at most max_seq) meet every change."""
    b0, s0 = example.shape[:2]
    dyn_b, dyn_s = ctx.config.dynamic_batch, ctx.config.dynamic_seq
    shapes = [(b if dyn_b else b0, s if dyn_s else s0) for b, s in _SMALL_PROBES]
    if dyn_s:
        reach = [k for k in constants if ctx.max_seq is None or k < ctx.max_seq]
        long = max(reach, default=0) + 2
        if ctx.max_seq is not None:
            long = min(long, ctx.max_seq)
        batch = 1 if dyn_b else b0
        if batch * long * long > MAX_PROBE_SEQ * MAX_PROBE_SEQ:  # a static batch probes at its own size
            return None
        if long > max(s for _, s in shapes):
            shapes.append((batch, long))
    return list(dict.fromkeys(shapes))


def _evaluator(gm: fx.GraphModule, nodes: list[fx.Node], mask: fx.Node) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for p in gm.graph.nodes:  # every placeholder, in order, so the probe takes the graph's inputs
        if p.op == "placeholder":
            env[p] = g.placeholder(p.name)
    for n in nodes:
        if n.op != "placeholder":
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[mask])
    return fx.GraphModule(gm, g)


def _kind(m: torch.Tensor, s: int) -> str | None:
    """'none' (all visible), 'causal', or None for any other pattern of one [.., s, s] mask. Compared one
    [s, s] slice at a time, and once per broadcast (stride-0) dim, so a long probe stays one s x s copy."""
    m = m.detach()
    if m.dtype != torch.bool and not m.is_floating_point():
        return None
    if m.dtype != torch.bool and not bool(((m == 0) | torch.isinf(m) | (m <= torch.finfo(m.dtype).min)).all()):
        return None
    visible = m if m.dtype == torch.bool else (m == 0)
    if visible.shape[-2:] != (s, s) and visible.shape[-2:] not in ((1, s), (s, 1), (1, 1)):
        return None
    visible = visible.expand(*visible.shape[:-2], s, s)
    for d in range(visible.dim() - 2):
        if visible.stride(d) == 0:
            visible = visible.narrow(d, 0, 1)
    causal = torch.ones(s, s, dtype=torch.bool, device=visible.device).tril()
    kinds = set()
    for idx in itertools.product(*map(range, visible.shape[:-2])):
        one = visible[idx]
        kinds.add("none" if bool(one.all()) else "causal" if torch.equal(one, causal) else None)
        if len(kinds) > 1 or None in kinds:
            return None
    return kinds.pop()


def _classify(gm: fx.GraphModule, ctx: PassContext, mask: fx.Node) -> tuple[str | None, str]:
    """The mask's kind and, when it is left alone, why."""
    nodes, examples = _ancestors(mask), ctx.example_inputs
    if not _shape_only(nodes):
        return None, "reads input data"
    if not all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in examples):
        return None, "inputs without (batch, seq) dims"
    shapes = probe_shapes(ctx, examples[0], mask_constants(gm, nodes))
    if shapes is None:
        return None, f"a constant needs a probe longer than {MAX_PROBE_SEQ}"
    probe = _evaluator(gm, nodes, mask)
    kinds = set()
    for b, s in shapes:
        inputs = [torch.zeros((b, s, *t.shape[2:]), dtype=t.dtype, device=t.device) for t in examples]
        try:
            with torch.no_grad():
                kinds.add(_kind(probe(*inputs), s))
        except RuntimeError as e:  # e.g. a dim export specialised: the mask is not a function of that size
            return None, f"probe at (batch {b}, seq {s}) failed: {str(e).splitlines()[0]}"
        if len(kinds) > 1 or None in kinds:
            return None, f"not all-visible or causal at (batch {b}, seq {s})"
    return kinds.pop(), ""


def simplify_attention_masks(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Matches SDPA calls whose mask is a function of the input sizes only; emits the same call with no mask
    (all-visible at every probe) or `is_causal=True` (causal at every probe). Any other mask stays, with a
    note naming the attention modules that keep it and why."""
    sdpas = calls(gm, aten.scaled_dot_product_attention.default)
    cache: dict[fx.Node, tuple[str | None, str]] = {}
    users: dict[fx.Node, list[str]] = {}
    rewritten = 0
    for node in sdpas:
        mask = _mask_arg(node)
        if not isinstance(mask, fx.Node) or node.kwargs.get("is_causal") or (len(node.args) > 5 and node.args[5]):
            continue
        if mask not in cache:
            cache[mask] = _classify(gm, ctx, mask)
        users.setdefault(mask, []).append(fqn_of(node) or node.name)
        kind = cache[mask][0]
        if kind is None:
            continue
        kwargs = {k: v for k, v in node.kwargs.items() if k != "attn_mask"}
        names = ["dropout_p", "is_causal", "scale", "enable_gqa"]
        for name, value in zip(names, node.args[4:]):
            kwargs[name] = value
        kwargs["is_causal"] = kind == "causal"
        node.args = tuple(node.args[:3])
        node.kwargs = kwargs
        rewritten += 1
    kept = [f"{len(users[m])} attention(s) keep their mask ({users[m][0]}...): {why}"
            for m, (k, why) in cache.items() if k is None and why != "reads input data"]
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    kinds = sorted({k for k, _ in cache.values() if k})
    return PassResult(gm, rewritten > 0, len(sdpas), rewritten,
                      [f"{rewritten} shape-only masks -> {', '.join(kinds) or 'none'}", *kept])
