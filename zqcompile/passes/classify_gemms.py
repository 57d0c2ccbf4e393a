"""classify_gemms: find every GEMM (`aten.linear` with a constant weight), name it by module FQN (one expert's
slice of a stacked MoE parameter as `<experts module>.<expert>.<parameter>`), give it a role (qkv / attn_out /
fc1 / fc2 / head / other by name; "router" for a GEMM whose output picks the top-k experts) and resolve its
scheme from the config (overrides first).

Emits no new nodes: it stores a GemmInfo in node.meta['zq_gemm'] and in ctx.gemms (the plan the report shows).
Before any weight is quantized it refuses NaN/Inf weights (WeightError naming the parameter) and groups that do
not fit a weight (ConfigError naming the module), and plans the K-group size actually used. An override that
changes no GEMM gets a ConfigWarning and a note with the closest names: a config may be shared across model
families, so that is no error, but a typo in a key must not pass silently.
"""
from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import replace

import torch
from torch import fx

from zqcompile.config import (ConfigError, GemmScheme, OverrideKey, classify_role, matching_overrides, override_text,
                              resolve_scheme, weight_groups_error)
from zqcompile.ops import quant_math as qm
from zqcompile.passes.base import (GemmInfo, PassContext, PassResult, WeightShard, aten, calls, fqn_of, get_tensor,
                                   is_call, is_placeholder, module_stack, param_name, warn_at_caller)
from zqcompile.errors import WeightError  # noqa: F401 - raised here, defined there

_MAX_NEAR = 5


def _literal(pattern: str) -> str:
    """The regex read as a plain name: escapes undone, character classes and operators dropped, so
    r"h\\.0\\.mlp\\.c_fcc$" compares with FQNs as "h.0.mlp.c_fcc"."""
    pattern = re.sub(r"\[[^\]]*\]|\\[A-Za-z]|[\^$*+?{}()|]", " ", pattern)
    return re.sub(r"\\(.)", r"\1", pattern).strip()


def _near_fqns(pattern: str, fqns: list[str]) -> list[str]:
    """GEMM FQNs closest to a regex key: by similarity to the FQN or its last parts (keys are re.search'ed,
    so "layers.0.mlp" is compared with "...layers.0.mlp"), then FQNs containing its longest literal piece."""
    lit = _literal(pattern)
    depth = lit.count(".") + 1

    def score(fqn: str) -> float:
        parts = fqn.split(".")
        tails = {".".join(parts[i:i + depth]) for i in range(len(parts))} | {fqn}
        return max(difflib.SequenceMatcher(None, lit, t).ratio() for t in tails)

    scored = sorted(((score(f), i, f) for i, f in enumerate(fqns)), key=lambda x: (-x[0], x[1]))
    near = [f for s, _, f in scored if s >= 0.75]
    piece = max(lit.split(), key=len, default="")
    if len(piece) >= 3:
        near += [f for f in fqns if piece in f and f not in near]
    return near[:_MAX_NEAR]


def _near_classes(cls: type, class_names: list[str]) -> list[str]:
    return difflib.get_close_matches(cls.__name__, class_names, n=_MAX_NEAR, cutoff=0.5)


def _unmatched_override_notes(keys: list[OverrideKey], hits: list[int], decided: list[int], fqns: list[str],
                              class_names: list[str]) -> list[str]:
    notes = []
    for i, key in enumerate(keys):
        if decided[i]:
            continue
        name = f"override {override_text(key)}"
        if hits[i]:
            notes.append(f"{name} changes nothing: the {hits[i]} GEMM(s) it matches are all decided by an earlier "
                         f"override (first match wins); move it before them or remove it")
            continue
        if isinstance(key, str):
            near = _near_fqns(key, fqns)
            hint = (f"near matches: {', '.join(map(repr, near))}" if near else
                    f"no GEMM name is close (GEMMs are named like {fqns[0]!r})" if fqns else "the model has no GEMMs")
        else:
            near = _near_classes(key, class_names)
            hint = (f"module classes around the GEMMs with similar names: {', '.join(near)}" if near else
                    f"no module class around the GEMMs is close (e.g. {', '.join(class_names[:_MAX_NEAR])})")
        notes.append(f"{name} matched no GEMM of this model, so it has no effect; {hint}")
    return notes


def _check_finite(gm: fx.GraphModule, node: fx.Node) -> None:
    """NaN/Inf in a GEMM's weight or bias, named by the user's parameter path, before any weight is
    quantized (and before sibling GEMMs are merged into one constant). A placeholder has no values yet: a
    streamed compile checks each weight as it loads it (zqcompile/streaming.py)."""
    for arg in node.args[1:3]:
        t = get_tensor(gm, arg)
        if t is not None and not is_placeholder(t):
            check_finite(param_name(arg), t)


def check_finite(name: str, t: torch.Tensor) -> None:
    """WeightError naming parameter `name` when the float tensor `t` holds NaN/Inf."""
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise WeightError(f"parameter {name!r} has {bad} NaN/Inf value(s); fix the checkpoint before quantizing")


def _as_applied(scheme: GemmScheme, fqn: str, shape: tuple[int, int]) -> GemmScheme:
    """The scheme exactly as this weight gets it: groups checked against [N, K] here, before any weight is
    quantized, and the default K-group size replaced by the size used, so the plan says what was applied."""
    wq = scheme.weight
    if wq is None:
        return scheme
    try:
        gk = qm.check_weight_groups(shape, wq.bits, wq.granularity, wq.num_groups, wq.group_size)
    except ValueError as e:
        raise weight_groups_error(fqn, shape, wq, str(e)) from None
    if wq.granularity == "k_groups" and wq.group_size is None:
        return replace(scheme, weight=replace(wq, group_size=gk))
    return scheme


def _check_shard(scheme: GemmScheme, fqn: str, shard: WeightShard) -> None:
    """A tensor-parallel rank's GEMM is quantized as its slice of the single-process GEMM: refuse, naming the
    module, what cannot be sliced (a group cut by the split, one scale for the whole tensor, a static input range
    calibrated on one rank's K slice)."""
    wq, n_k = scheme.weight, " x ".join(map(str, shard.full.shape))
    split = (f"tp={shard.ranks} splits {fqn} (weight N x K = {n_k}) along "
             f"{'N (column-parallel)' if shard.dim == 0 else 'K (row-parallel)'}")
    if wq is None:
        return
    if wq.granularity == "tensor":
        raise ConfigError(f"{split}: its per-tensor weight scale cannot be kept on one rank's slice; use per-row or "
                          f"K-group weight scales (e.g. preset 'w8a8'), or run without tp")
    if shard.dim == 1 and scheme.act.mode == "tensor":
        raise ConfigError(f"{split}: a static per-tensor input range would be calibrated on one rank's K slice; use "
                          f"token-wise activations (e.g. preset 'w8a8'), or run without tp")
    try:
        qm.check_shard_groups(tuple(shard.full.shape), shard.dim, shard.start, shard.size, wq.bits, wq.granularity,
                              wq.num_groups, wq.group_size)
    except ValueError as e:
        raise ConfigError(f"{split}: each rank's slice must hold whole groups, but {e}; choose groups that divide "
                          f"the slice of {shard.size} (e.g. WeightQuant(group_size=...) for K groups), or run "
                          f"without tp") from None


def gemm_name(node: fx.Node) -> str:
    """The GEMM's name in the plan: its module's FQN, or for one slice of a stacked parameter (an expert's
    weight, canonicalize_gemms) the slice as if it were a module of its own: 'mlp.experts.3.gate_up_proj'."""
    stacked = node.args[1].meta.get("zq_stacked")
    if stacked is not None:
        param, indices = stacked
        module, _, leaf = param.rpartition(".")
        return ".".join([module, *map(str, indices), leaf] if module else [*map(str, indices), leaf])
    return fqn_of(node) or param_name(node.args[1]).rsplit(".", 1)[0]


# Between a router's logits and the top-k that picks the experts: a softmax / sigmoid, a cast, a bias.
_TO_TOPK = 4


def _routes_tokens(node: fx.Node) -> bool:
    """Does the GEMM's output reach an `aten.topk` within a few ops (MoE routers: softmax -> topk), without
    passing another GEMM? Quantization noise there would change which experts a token goes to."""
    frontier, seen = [node], {node}
    for _ in range(_TO_TOPK):
        frontier = [u for n in frontier for u in n.users if u not in seen and not is_call(u, aten.linear.default)]
        if any(is_call(u, aten.topk.default) for u in frontier):
            return True
        seen.update(frontier)
    return False


def classify_gemms(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    ctx.gemms.clear()
    keys = [k for k, _ in ctx.config.overrides]
    hits, decided = [0] * len(keys), [0] * len(keys)
    fqns: list[str] = []
    class_names: list[str] = []
    smaller_groups: Counter = Counter()  # (group size used, K) -> GEMMs where the default K group did not fit
    for node in calls(gm, aten.linear.default):
        w = get_tensor(gm, node.args[1])
        if w is None or w.dim() != 2:
            continue  # activation x activation products (attention scores) are not weight GEMMs
        _check_finite(gm, node)
        fqn = gemm_name(node)
        role = "router" if _routes_tokens(node) else classify_role(fqn)
        types = [t for _, t in module_stack(node)]
        scheme, rule = resolve_scheme(ctx.config, fqn, role, types)
        shard = ctx.shard_of(w)  # a tensor-parallel slice: its groups are those of the full weight
        shape = tuple((shard.full if shard else w).shape)
        applied = _as_applied(scheme, fqn, shape)
        if shard is not None:
            _check_shard(applied, fqn, shard)
        if applied is not scheme and applied.weight.group_size != qm.DEFAULT_K_GROUP:
            smaller_groups[(applied.weight.group_size, shape[1])] += 1
        scheme = applied
        matches = matching_overrides(ctx.config, fqn, types)
        for i in matches:
            hits[i] += 1
        if matches:
            decided[matches[0]] += 1
        info = GemmInfo(fqn, role, scheme, rule, tuple(w.shape), parts=((fqn, int(w.shape[0])),))
        node.meta["zq_gemm"] = info
        ctx.gemms.append(info)
        fqns.append(fqn)
        for t in types:
            name = t.__name__ if isinstance(t, type) else str(t).rsplit(".", 1)[-1]
            if name not in class_names and not name.startswith("_"):  # not capture's private wrapper
                class_names.append(name)
    notes = [f"{len(fqns)} GEMMs found"]
    notes += [f"K groups of {g} for {c} GEMM(s) with K={k} (the default {qm.DEFAULT_K_GROUP} does not fit K)"
              for (g, k), c in sorted(smaller_groups.items())]
    for line in _unmatched_override_notes(keys, hits, decided, fqns, class_names):
        if ctx.warn:
            warn_at_caller(line)
        notes.append(line)
    return PassResult(gm, False, len(fqns), 0, notes)
