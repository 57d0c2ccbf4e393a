"""The shared matcher (passes/match.py) and the schema-name argument helpers (passes/base.py) on small
hand-built graphs: what a pattern matches and what not, captures, alternatives, commuted operands, the rule
loop's records, and arguments read / written by name on aten and zq ops."""
import pytest
import torch
from torch import fx, nn

from zqcompile.passes.base import PassContext, arg, aten, last_of, set_arg, shape_of, zq
from zqcompile.config import get_config
from zqcompile.passes.match import P, Rule, Fused, match, rewrite, substitute

QUANT = zq.quantize_per_token.default


class G:
    """A graph under construction: placeholders carry a tensor as meta['val'] (what the passes read shapes from)."""

    def __init__(self):
        self.graph = fx.Graph()

    def input(self, name: str, *shape: int, dtype=torch.float32) -> fx.Node:
        n = self.graph.placeholder(name)
        n.meta["val"] = torch.zeros(shape, dtype=dtype)
        return n

    def __call__(self, op, *args, **kwargs) -> fx.Node:
        n = self.graph.call_function(op, args, kwargs)
        vals, kw = fx.node.map_arg((args, kwargs), lambda a: a.meta["val"])
        n.meta["val"] = op(*vals, **kw)
        return n

    def module(self, *outputs: fx.Node) -> fx.GraphModule:
        self.graph.output(outputs[0] if len(outputs) == 1 else outputs)
        return fx.GraphModule(nn.Module(), self.graph)


def test_op_pattern_matches_by_target_and_captures_arguments():
    g = G()
    x = g.input("x", 2, 4)
    gelu, relu = g(aten.gelu.default, x), g(aten.relu.default, x)
    m = match(P(aten.gelu.default, P.any("x"), name="act"), gelu)
    assert m is not None and m["x"] is x and m["act"] is gelu and m.root is gelu
    assert m.nodes == [gelu] and m.replaced == ["aten.gelu"] and m.inner == []
    assert match(P(aten.gelu.default, P.any("x")), relu) is None
    assert match(P((aten.gelu.default, aten.relu.default), P.any()), relu) is not None  # a tuple of ops
    assert match(P(aten.gelu.default, P.any()), x) is None  # a placeholder is no call


def test_keyword_and_default_arguments_match_by_schema_name():
    g = G()
    x = g.input("x", 2, 4)
    plain, tanh = g(aten.gelu.default, x), g(aten.gelu.default, x, approximate="tanh")
    TANH = P(aten.gelu.default, P.any(), approximate="tanh")
    assert match(TANH, tanh) is not None and match(TANH, plain) is None
    assert match(P(aten.gelu.default, P.any(), approximate="none"), plain) is not None  # the schema's default
    cat = g(aten.cat.default, [x, x])  # dim not given: 0 by the schema
    assert match(P(aten.cat.default, [P.any(), P.any()], 0), cat) is not None
    assert match(P(aten.cat.default, [P.any(), P.any()], -1), cat) is None
    assert match(P(aten.cat.default, [P.any()]), cat) is None  # a list pattern needs the same length
    assert match(P(aten.relu.default, P.any(), approximate="none"), g(aten.relu.default, x)) is None  # no such arg


def test_a_name_met_twice_is_the_same_node():
    g = G()
    x, y = g.input("x", 4), g.input("y", 4)
    square, other = g(aten.mul.Tensor, x, x), g(aten.mul.Tensor, x, y)
    SQUARE = P(aten.mul.Tensor, P.any("x"), P.any("x"))
    assert match(SQUARE, square)["x"] is x
    assert match(SQUARE, other) is None
    assert match(SQUARE, other, {"x": y}) is None and match(P(aten.mul.Tensor, P.any("x"), P.any()), other, {"x": x})


def test_commute_alternatives_and_backtracking():
    g = G()
    a, b = g.input("a", 2, 4), g.input("b", 2, 4)
    silu = g(aten.silu.default, a)
    left, right = g(aten.mul.Tensor, silu, b), g(aten.mul.Tensor, b, silu)
    GATED = P(aten.mul.Tensor, P(aten.silu.default, P.any("gate")), P.node("up"), commute=True)
    for n in (left, right):
        m = match(GATED, n)
        assert m["gate"] is a and m["up"] is b and m.replaced == ["aten.silu", "aten.mul"] and m.inner == [silu]
    assert match(P(aten.mul.Tensor, P(aten.silu.default, P.any()), P.any()), right) is None  # no commute
    # alternatives: the first that matches, its captures only
    OPT_SILU = P(aten.silu.default, P.any("gate"), name="x") | P.any("x")
    assert match(OPT_SILU, silu) == {"x": silu, "gate": a} and match(OPT_SILU, b) == {"x": b}
    # a later failure backtracks into the commuted order: x must also be what the neg reads
    c = g(aten.neg.default, b)
    add = g(aten.add.Tensor, g(aten.mul.Tensor, a, b), c)
    SCALED_PLUS_NEG = P(aten.add.Tensor, P(aten.mul.Tensor, P.any("x"), P.any("w"), commute=True),
                        P(aten.neg.default, P.any("x")))
    m = match(SCALED_PLUS_NEG, add)
    assert m["x"] is b and m["w"] is a


def test_where_predicates_read_captures_by_name():
    g = G()
    a, b, row = g.input("a", 2, 4), g.input("b", 2, 4), g.input("row", 4)
    same, bcast = g(aten.add.Tensor, a, b), g(aten.add.Tensor, a, row)
    SAME_SHAPE = P(aten.add.Tensor, P.node("a"), P.node("b"), where=lambda a, b: shape_of(a) == shape_of(b))
    assert match(SAME_SHAPE, same) is not None and match(SAME_SHAPE, bcast) is None
    ONE_USER = P(aten.add.Tensor, P.node("a", where=lambda a: len(a.users) == 1), P.any())
    assert match(ONE_USER, same) is None  # a feeds both adds
    assert match(P(aten.add.Tensor, P.any(), P.num(0.5)), g(aten.add.Tensor, a, 0.5000001)) is not None
    assert match(P(aten.add.Tensor, P.any(), P.num(0.5)), g(aten.add.Tensor, a, 0.501)) is None
    assert match(P(aten.add.Tensor, P.any(), P.num(1.0)), same) is None  # a node is no number


def test_arg_and_set_arg_by_schema_name_on_aten_and_zq_ops():
    g = G()
    x, w, b = g.input("x", 2, 8), g.input("w", 8), g.input("b", 8)
    ln = g.graph.call_function(aten.layer_norm.default, (x, [8], w))
    assert arg(ln, "input") is x and arg(ln, "weight") is w and arg(ln, "bias") is None and arg(ln, "eps") == 1e-5
    set_arg(ln, "eps", 1e-6)  # not given: becomes a keyword
    assert arg(ln, "eps") == 1e-6 and ln.kwargs == {"eps": 1e-6}
    set_arg(ln, "weight", b)  # given positionally: replaced in place
    assert ln.args[2] is b and not w.users
    gelu = g.graph.call_function(aten.gelu.default, (x,), {"approximate": "tanh"})
    assert arg(gelu, "approximate") == "tanh"
    gemm = g.graph.call_function(zq.weight_only_gemm.default, (x, w, b, None, None, "none", 8))
    assert arg(gemm, "residual") is None and arg(gemm, "act") == "none" and arg(gemm, "w_bits") == 8
    set_arg(gemm, "act", "gelu")
    set_arg(gemm, "residual", x)
    assert gemm.args == (x, w, b, None, x, "gelu", 8)
    with pytest.raises(KeyError, match="no argument 'gate'"):
        arg(gemm, "gate")


def test_last_of_follows_graph_order_as_nodes_are_inserted():
    g = G()
    x = g.input("x", 4)
    r = g(aten.relu.default, x)
    s = g(aten.sin.default, r)
    with g.graph.inserting_before(s):
        late = g.graph.call_function(aten.neg.default, (r,))
    assert last_of([x, None, late, r]) is late and last_of([s, late]) is s and r < late < s


def _toy():
    """quant(gelu(x)), quant(relu(y)), quant(x + y): a fusion table sees one of each."""
    g = G()
    x, y = g.input("x", 2, 4), g.input("y", 2, 4)
    outs = [g(QUANT, g(aten.gelu.default, x)), g(QUANT, g(aten.relu.default, y)), g(QUANT, g(aten.add.Tensor, x, y))]
    return g.module(*outs), outs


def _to_sin(gm, m):
    with gm.graph.inserting_before(m.root):
        new = gm.graph.call_function(aten.sin.default, (m["x"],))
    substitute(gm, m.root, new)
    gm.graph.erase_node(m["act"])
    return Fused(new, "aten.sin", "toy")


def test_rewrite_applies_the_first_rule_and_records_fusions_and_refusals():
    gm, quants = _toy()
    ctx = PassContext(get_config("none"))
    rules = [
        Rule(P(QUANT, P(aten.gelu.default, P.any("x"), name="act")), _to_sin, "gelu+quant"),
        Rule(P(QUANT, P(aten.relu.default, P.any("x"), name="act")), _to_sin, "relu+quant",
             unless=((lambda x: shape_of(x) == (2, 4), "relu of a [2, 4] input is kept"),), candidate="relu"),
        Rule.refuse(P(QUANT, P.node("x")), lambda x: f"quant of {x.name}", "no kernel"),
        Rule(P(QUANT, P.any("x")), _to_sin, "never reached"),
    ]
    done = rewrite(gm, ctx, rules, quants)
    assert (done.matched, done.rewritten, dict(done.kinds)) == (3, 1, {"gelu+quant": 1})
    assert [(f.kind, f.replaced, f.fused_op, f.note) for f in ctx.fusions] == [
        ("gelu+quant", ["aten.gelu", "zq.quantize_per_token"], "aten.sin", "toy")]
    assert [(n.candidate, n.reason) for n in ctx.not_fused] == [("relu", "relu of a [2, 4] input is kept"),
                                                                ("quant of add_tensor", "no kernel")]
    gm.graph.lint()
    assert sum(n.target == aten.sin.default for n in gm.graph.nodes) == 1
    assert not any(n.target == aten.gelu.default for n in gm.graph.nodes)


def _gemm_like():
    g = G()
    x, r = g.input("x", 2, 4), g.input("r", 2, 4)
    h = g(aten.mul.Tensor, x, 2.0)  # stands for a GEMM: absorbs its activation, then its residual
    return g.module(g(aten.add.Tensor, r, g(aten.relu.default, h))), h


@pytest.mark.parametrize("all_rules", [False, True])
def test_rewrite_at_consumers_of_an_anchor(all_rules):
    ALONE = P.node("h", where=lambda h: len(h.users) == 1)

    def absorb(gm, m):
        substitute(gm, m.root, m["h"])
        return Fused(m["h"], "mul")

    rules = [Rule(P(aten.relu.default, ALONE), absorb, "act"),
             Rule(P(aten.add.Tensor, ALONE, P.any("res"), commute=True), absorb, "residual")]
    gm, h = _gemm_like()
    ctx = PassContext(get_config("none"))
    done = rewrite(gm, ctx, rules, [h], consumers_of="h", all_rules=all_rules)
    kinds = [("act", ["aten.relu"]), ("residual", ["aten.add"])] if all_rules else [("act", ["aten.relu"])]
    assert done.rewritten == len(kinds) and [(f.kind, f.replaced) for f in ctx.fusions] == kinds
    gm.graph.lint()
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == (
        [aten.mul.Tensor] if all_rules else [aten.mul.Tensor, aten.add.Tensor])
