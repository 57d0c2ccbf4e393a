"""The one matcher every fusion pass uses: patterns are small objects over fx nodes, a fusion is a flat table
of rules (pattern -> replacement builder -> fusion-record kind), and `rewrite` is the loop that applies it.

    GELU = P(aten.gelu.default, P.any("x"), approximate="tanh", name="prod")
    m = match(P(zq.quantize_per_token.default, GELU), node)  # None, or m["x"], m["prod"], m.root, m.nodes

Arguments are matched by the op's schema (positional, keyword or default alike), so a pattern does not depend
on how export spelled the call. In-house rather than torch.fx's `replace_pattern_with_filters`: our rewrites
keep each node's meta (`nn_module_stack`, `zq_gemm`, `val`) and record what they did or why not
(FusionRecord / NotFused), and most of our patterns have optional parts (a residual add before a norm, a cast,
repeat_kv), commutative operands or constraints on shapes and constants, which traced subgraph patterns need
one variant each for.
"""
from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from torch import fx

from zqcompile.passes.base import FusionRecord, NotFused, PassContext, arg, fqn_of

_State = tuple[dict, tuple]  # (captures, matched op nodes in post-order)


class P:
    """A pattern. `P(op, *args, name=, where=, commute=, **kwargs)`: a call of `op` (or of any op in a tuple /
    set / dict of ops) whose arguments, by schema position or name, match `args` / `kwargs`: sub-patterns,
    literals (compared with ==) or lists of them; arguments not given are not looked at. `P.any(name)`: any
    value; `P.node(name)`: any fx node; `P.num(v)`: a number close to v; `p | q`: the first that matches.
    `name` captures what matched; a name met twice (or bound by the caller) must be the same node. `where` is
    a predicate called with the captures its parameters name (`where=lambda a, b: shape_of(a) == shape_of(b)`),
    checked once the pattern's arguments matched. `commute=True` also tries the two operands swapped."""

    def __init__(self, op=None, *args, name: str | None = None, where: Callable[..., bool] | None = None,
                 commute: bool = False, **kwargs):
        many = isinstance(op, (tuple, list, set, frozenset, dict))
        self.ops = frozenset(op) if many else None if op is None else frozenset([op])
        self.kind = "op" if op is not None else "any"
        self.args, self.kwargs, self.name, self.where, self.commute = args, kwargs, name, where, commute
        self.test: Callable[[Any], bool] | None = None  # a check of the value itself (P.node, P.num)
        self.alts: tuple[P, ...] = ()

    @staticmethod
    def any(name: str | None = None, where: Callable[..., bool] | None = None) -> "P":
        return P(None, name=name, where=where)

    @staticmethod
    def node(name: str | None = None, where: Callable[..., bool] | None = None) -> "P":
        p = P(None, name=name, where=where)
        p.test = lambda v: isinstance(v, fx.Node)
        return p

    @staticmethod
    def num(value: float, tol: float = 1e-6) -> "P":
        p = P(None)
        p.test = lambda v: isinstance(v, (int, float)) and abs(v - value) <= tol * max(1.0, abs(value))
        return p

    def __or__(self, other: "P") -> "P":
        p = P(None)
        p.kind, p.alts = "alt", (*(self.alts or (self,)), *(other.alts or (other,)))
        return p

    def __repr__(self) -> str:
        if self.kind == "alt":
            return " | ".join(map(repr, self.alts))
        ops = ",".join(sorted(str(o) for o in self.ops)) if self.ops else "any"
        return f"P({ops}{', ' + self.name if self.name else ''})"


class Match(dict):
    """The captures of one match (name -> node or value), the node it matched at (`root`), and the nodes the
    pattern's ops matched, inputs first (`nodes`: ends with `root`; captures bound in advance are not in it)."""

    def __init__(self, root: fx.Node, captures: dict, nodes: tuple):
        super().__init__(captures)
        self.root, self.nodes = root, list(nodes)

    @property
    def inner(self) -> list[fx.Node]:
        """The matched op nodes below the root (what a fusion usually leaves dead)."""
        return [n for n in self.nodes if n is not self.root]

    @property
    def replaced(self) -> list[str]:
        """The matched ops as the fusion report names them ('aten.add', 'zq.quantize_per_token')."""
        return [op_name(n) for n in self.nodes]


def op_name(node: fx.Node) -> str:
    schema = getattr(node.target, "_schema", None)
    return schema.name.replace("::", ".") if schema is not None else str(node.target)


def match(pattern: P, node: fx.Node, bound: dict | None = None) -> Match | None:
    """The first way `pattern` matches at `node` (with the captures `bound` given in advance), or None."""
    for caps, nodes in _match(pattern, node, dict(bound or {}), ()):
        return Match(node, caps, nodes)
    return None


def _call(fn: Callable[..., Any], caps: dict):
    """fn called with the captures its parameters name (tinygrad's convention for rewrite functions)."""
    return fn(**{n: caps[n] for n in _param_names(fn) if n in caps})


@lru_cache(maxsize=None)
def _param_names(fn: Callable) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def _same(a, b) -> bool:
    return a is b if isinstance(a, fx.Node) or isinstance(b, fx.Node) else a == b


def _match(p: P, v, caps: dict, nodes: tuple) -> Iterator[_State]:
    if p.kind == "alt":
        for q in p.alts:
            yield from _match(q, v, caps, nodes)
        return
    if p.test is not None and not p.test(v):
        return
    if p.kind == "op" and not (isinstance(v, fx.Node) and v.op == "call_function" and v.target in p.ops):
        return
    if p.name is not None:
        if p.name in caps:
            if not _same(caps[p.name], v):
                return
        else:
            caps = {**caps, p.name: v}
    for caps2, nodes2 in (_match_args(p, v, caps, nodes) if p.kind == "op" else iter([(caps, nodes)])):
        if p.where is None or _call(p.where, caps2):
            yield caps2, (nodes2 + (v,) if p.kind == "op" else nodes2)


_MISSING = object()


def _value(node: fx.Node, key: int | str):
    """Argument `key` (schema position or name) of a call, or _MISSING when the op has no such argument."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:  # operator.getitem and other Python callables: as called
        if isinstance(key, int):
            return node.args[key] if key < len(node.args) else _MISSING
        return node.kwargs.get(key, _MISSING)
    if isinstance(key, int):
        if key >= len(schema.arguments):
            return _MISSING
        key = schema.arguments[key].name
    try:
        return arg(node, key)
    except KeyError:
        return _MISSING


def _match_args(p: P, node: fx.Node, caps: dict, nodes: tuple) -> Iterator[_State]:
    values = [_value(node, i) for i in range(len(p.args))]
    kw = [(sub, _value(node, k)) for k, sub in p.kwargs.items()]
    orders = [values] + ([values[::-1]] if p.commute and len(values) == 2 else [])
    for vals in orders:
        pairs = list(zip(p.args, vals)) + kw
        if all(v is not _MISSING for _, v in pairs):
            yield from _match_seq(pairs, caps, nodes)


def _match_seq(pairs: list, caps: dict, nodes: tuple) -> Iterator[_State]:
    if not pairs:
        yield caps, nodes
        return
    (sub, v), rest = pairs[0], pairs[1:]
    for caps2, nodes2 in _match_one(sub, v, caps, nodes):
        yield from _match_seq(rest, caps2, nodes2)


def _match_one(sub, v, caps: dict, nodes: tuple) -> Iterator[_State]:
    if isinstance(sub, P):
        yield from _match(sub, v, caps, nodes)
    elif isinstance(sub, (list, tuple)):
        if isinstance(v, (list, tuple)) and len(v) == len(sub):
            yield from _match_seq(list(zip(sub, v)), caps, nodes)
    elif not isinstance(v, fx.Node) and v == sub:
        yield caps, nodes


# ---- rules and the loop ----------------------------------------------------------------------------------
class Fused(NamedTuple):
    """What a rule's builder emitted: the node now computing the pattern's result (the record's FQN is read
    from it), the fused op's name as the report shows it, a note, and the replaced ops when not the matched ones."""

    node: fx.Node
    op: str
    note: str = ""
    replaced: list[str] | None = None


Builder = Callable[[fx.GraphModule, Match], "Fused | None"]


@dataclass(frozen=True)
class Rule:
    """Where `pattern` matches, the first of `unless` (check, reason) that holds records NotFused(candidate,
    fqn, reason); otherwise `build(gm, m)` rewrites the graph and returns what it emitted (None: nothing to
    record), recorded as FusionRecord(kind, ...). The checks are called like `where` predicates."""

    pattern: P
    build: Builder | None
    kind: str = ""
    unless: tuple[tuple[Callable[..., bool], str], ...] = ()
    candidate: str | Callable[..., str] = ""

    @classmethod
    def refuse(cls, pattern: P, candidate: str | Callable[..., str], reason: str) -> "Rule":
        """A candidate that has no fused form: matched, counted, and reported as not fused with `reason`."""
        return cls(pattern, None, unless=((lambda: True, reason),), candidate=candidate)


@dataclass
class Rewrites:
    matched: int = 0  # rule matches, fused or refused
    rewritten: int = 0
    kinds: Counter = field(default_factory=Counter)  # rewrites per rule kind


def rewrite(gm: fx.GraphModule, ctx: PassContext, rules: list[Rule], anchors: Iterable[fx.Node], *,
            fqn: Callable[[fx.Node], str] = fqn_of, consumers_of: str | None = None,
            all_rules: bool = False) -> Rewrites:
    """Apply `rules` at each anchor, in graph order: the first rule that matches wins (`all_rules`: each rule
    in turn, so a GEMM takes an activation, then a residual). Patterns match at the anchor itself, or, with
    `consumers_of="gemm"`, at each of its users with the anchor bound as "gemm". A refusal ends the anchor's
    turn. Records name `fqn(node)`: the emitted node for a fusion, the anchor for a refusal."""
    done = Rewrites()
    for anchor in list(anchors):
        for rule in rules:
            m = _match_rule(rule.pattern, anchor, consumers_of)
            if m is None:
                continue
            done.matched += 1
            reason = next((why for check, why in rule.unless if _call(check, m)), None)
            if reason is not None:
                what = rule.candidate if isinstance(rule.candidate, str) else _call(rule.candidate, m)
                ctx.not_fused.append(NotFused(what, fqn(anchor), reason))
                break
            fused = rule.build(gm, m)
            done.rewritten += 1
            done.kinds[rule.kind] += 1
            if fused is not None:
                replaced = m.replaced if fused.replaced is None else fused.replaced
                ctx.fusions.append(FusionRecord(rule.kind, fqn(fused.node), replaced, fused.op, fused.note))
            if not all_rules:
                break
    return done


def _match_rule(pattern: P, anchor: fx.Node, consumers_of: str | None) -> Match | None:
    if consumers_of is None:
        return match(pattern, anchor)
    return next((m for user in list(anchor.users) if (m := match(pattern, user, {consumers_of: anchor}))), None)


# ---- what builders share ---------------------------------------------------------------------------------
def substitute(gm: fx.GraphModule, old: fx.Node, new: fx.Node) -> None:
    """`new` takes over every use of `old`, which is erased."""
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)


def erase_unused(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase those of `nodes` (a match's, inputs first) that nothing reads any more, consumers first."""
    for n in reversed(nodes):
        if not n.users:
            gm.graph.erase_node(n)


__all__ = ["Fused", "Match", "P", "Rewrites", "Rule", "erase_unused", "match", "op_name", "rewrite", "substitute"]
