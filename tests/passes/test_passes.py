"""Each pass on a tiny hand-built module: what it matched / emitted (op counts) and numerics vs eager."""
import math

import pytest
import torch
from torch import nn

from zqcompile.ops import quant_math as qm
from zqcompile.passes import PassContext
from zqcompile.config import get_config

from .helpers import Block, before_and_after, captured, count, run_until

aten, zq = torch.ops.aten, torch.ops.zq


def inputs(seed=0, d=32):
    g = torch.Generator().manual_seed(seed)
    x, r = torch.randn(2, 8, d, generator=g), torch.randn(2, 8, d, generator=g)
    x[1, 3] *= 20  # an outlier token
    return x, r


class HandWritten(nn.Module):
    """RMSNorm and tanh-GeLU written out as Hugging Face writes them."""

    def __init__(self):
        super().__init__()
        from transformers.activations import NewGELUActivation
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        self.norm, self.act, self.fc1 = LlamaRMSNorm(32, 1e-6), NewGELUActivation(), nn.Linear(32, 32)

    def forward(self, x, r):
        return self.act(self.fc1(self.norm(x + r)))


def test_fold_decomposed_ops_rmsnorm_and_tanh_gelu():
    m = HandWritten()
    b, a, res, gm, _ = before_and_after(m, inputs(), "w8a8", "fold_decomposed_ops")
    assert res.rewritten == 2
    assert count(gm, aten.rms_norm.default) == 1 and count(gm, aten.tanh.default) == 0
    assert count(gm, aten.gelu.default) == 1
    assert torch.allclose(a, m(*inputs()), atol=1e-6) and torch.allclose(a, b, atol=1e-6)


def test_canonicalize_gemms_conv1d_becomes_linear():
    from transformers.pytorch_utils import Conv1D

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.c_fc = Conv1D(48, 32)
            self.drop = nn.Dropout(0.1)

        def forward(self, x, r):
            return self.drop(self.c_fc(x + r))

    m = M().eval()
    b, a, res, gm, _ = before_and_after(m, inputs(), "w8a8", "canonicalize_gemms")
    assert res.rewritten == 1
    assert count(gm, aten.addmm.default) == 0 and count(gm, aten.linear.default) == 1
    assert count(gm, aten.dropout.default) == 0 and count(gm, aten.view.default) == 0
    assert torch.allclose(a, m(*inputs()), atol=1e-6)


def test_classify_gemms_roles_and_overrides():
    cfg = get_config("w4/8a8").with_overrides({r"^k_proj$": "fp16", nn.GELU: "w8a8"})
    gm = captured(Block(), *inputs())
    ctx = PassContext(cfg, inputs())
    with pytest.warns(UserWarning, match="override type GELU matched no GEMM"):  # no Linear inside the GELU
        run_until(gm, ctx, "classify_gemms")
    plan = {g.fqn: g for g in ctx.gemms}
    assert {f: g.role for f, g in plan.items()} == {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv",
                                                    "fc1": "fc1", "fc2": "fc2"}
    assert plan["k_proj"].scheme.is_float and "override" in plan["k_proj"].rule
    assert plan["fc1"].scheme.weight.bits == 4 and plan["q_proj"].scheme.weight.bits == 8


def test_classify_gemms_warns_about_overrides_that_change_nothing():
    from zqcompile.config import ConfigWarning
    cfg = get_config("w8a8").with_overrides({r"^k_proj$": "fp16", r"^k_prj$": "fp", nn.GELU: "fp",
                                             r"k_proj": "w8a16", r"q_proj|fc2": "w8a16"})
    gm = captured(Block(), *inputs())
    ctx = PassContext(cfg, inputs())
    with pytest.warns(ConfigWarning) as rec:
        res = run_until(gm, ctx, "classify_gemms")
    expected = [
        "override '^k_prj$' matched no GEMM of this model, so it has no effect; near matches: 'k_proj'",
        "override type GELU matched no GEMM of this model, so it has no effect; no module class around the GEMMs "
        "is close (e.g. Block, Linear)",
        "override 'k_proj' changes nothing: the 1 GEMM(s) it matches are all decided by an earlier override "
        "(first match wins); move it before them or remove it",
    ]
    assert [str(w.message) for w in rec] == expected
    assert res.notes == ["5 GEMMs found", *expected]
    plan = {g.fqn: g.rule for g in ctx.gemms}
    assert plan["k_proj"] == "override '^k_proj$'" and plan["fc2"] == "override 'q_proj|fc2'"


def test_group_wise_weight_replaces_weights_with_dequantized_int8():
    m = Block()
    b, a, res, gm, _ = before_and_after(m, inputs(), "w8a8", "group_wise_weight")
    assert res.rewritten == 5 and count(gm, zq.dequantize_weight.default) == 5
    # numerics: eager with every weight replaced by its dequantized INT8 copy
    ref = Block()
    for lin in (ref.q_proj, ref.k_proj, ref.v_proj, ref.fc1, ref.fc2):
        lin.weight.data = qm.dequantize_weight(*qm.quantize_weight(lin.weight, 8), 8, torch.float32)
    assert torch.allclose(a, ref(*inputs()), atol=1e-5)
    assert 0 < float((a - b).norm() / b.norm()) < 0.01


def test_group_wise_weight_names_nan_parameter():
    m = Block()
    m.fc2.weight.data[0, 0] = float("nan")
    from zqcompile.passes import WeightError
    with pytest.raises(WeightError, match="fc2.weight"):
        before_and_after(m, inputs(), "w8a8", "group_wise_weight")


def test_concat_sibling_gemms_merges_qkv_exactly():
    m = Block()
    b, a, res, gm, ctx = before_and_after(m, inputs(), "w8a8", "concat_sibling_gemms", merge_gemms=True)
    assert res.rewritten == 1 and count(gm, aten.linear.default) == 3  # qkv, fc1, fc2
    assert count(gm, aten.split_with_sizes.default) == 1
    assert torch.allclose(a, b, atol=1e-6)
    assert [g.fqn for g in ctx.gemms if g.role == "qkv"] == ["q_proj+k_proj+v_proj"]
    assert ctx.fusions[0].kind == "concat:qkv" and ctx.fusions[0].replaced == ["q_proj", "k_proj", "v_proj"]
    # different schemes are never merged
    b, a, res, gm, ctx = before_and_after(m, inputs(), get_config("w8a8").with_overrides({"k_proj": "fp"}),
                                          "concat_sibling_gemms", merge_gemms=True)
    assert res.rewritten == 1 and [g.fqn for g in ctx.gemms if g.role == "qkv"].count("q_proj+v_proj") == 1


def test_merged_quantized_gemms_defer_their_float_concatenation():
    """The float concatenation of a quantized merged GEMM never becomes a graph constant (at the Llama-3-8B shape
    all of them together were 9 GB of the compile peak); group_wise_weight quantizes it one GEMM at a time, to
    exactly what quantizing the concatenated weight gives."""
    m = Block()
    _, _, _, gm, _ = before_and_after(m, inputs(), "w8a8", "concat_sibling_gemms", merge_gemms=True)
    floats = {n for n, t in gm.named_buffers() if t.is_floating_point() and t.dim() == 2}
    assert not any("q_proj" in n and "k_proj" in n for n in floats), floats
    assert count(gm, aten.cat.default) == 1
    b, a, _, gm, _ = before_and_after(m, inputs(), "w8a8", "group_wise_weight", merge_gemms=True)
    assert count(gm, aten.cat.default) == 0 and torch.allclose(a, b, rtol=0.05, atol=0.05)
    wq = next(t for n, t in gm.named_buffers() if "q_proj" in n and "v_proj" in n and n.endswith("_wq"))
    ref, _ = qm.quantize_weight(torch.cat([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]), 8, "row_groups")
    assert torch.equal(wq, ref)


def test_token_wise_quant_shares_one_quant_for_qkv():
    b, a, res, gm, _ = before_and_after(Block(), inputs(), "w8a8", "token_wise_quant")
    assert res.rewritten == 5
    assert count(gm, zq.quantize_per_token.default) == 3  # q/k/v share the LayerNorm output; fc1; fc2
    err = float((a - b).norm() / b.norm())
    assert 0 < err < 0.02


def test_static_calibration_sets_amax_over_127():
    x, r = inputs()
    gm = captured(Block(), x, r)
    ctx = PassContext(get_config("ptq-static"), (x, r))
    run_until(gm, ctx, "calibrate_static_ranges")
    ln_out = nn.functional.layer_norm(x + r, (32,), Block().ln.weight, Block().ln.bias).detach()
    scales = sorted(float(getattr(gm, n.args[1].target)) for n in gm.graph.nodes
                    if n.op == "call_function" and n.target == zq.quantize_per_tensor.default)
    assert len(scales) == 3
    assert any(math.isclose(s, float(ln_out.abs().max()) / 127, rel_tol=1e-5) for s in scales)


def test_fuse_producer_quant_layernorm_residual_and_gelu():
    b, a, res, gm, ctx = before_and_after(Block(), inputs(), "w8a8", "fuse_producer_quant")
    assert count(gm, zq.norm_quant.default) == 1 and count(gm, zq.act_quant.default) == 1
    assert count(gm, aten.layer_norm.default) == 0 and count(gm, aten.gelu.default) == 0
    nq = next(n for n in gm.graph.nodes if n.target == zq.norm_quant.default)
    assert nq.args[1] is not None  # the residual add went into the kernel
    assert nq.args[6] is False and nq.args[7] is True  # LN output only quantized; sum kept for the residual
    kinds = sorted(f.kind for f in ctx.fusions)
    assert kinds == ["add+layernorm+quant", "gelu+quant"]
    assert torch.equal(a, b)  # fusion changes no number
    # fc1's input, q*k + v, has no fused producer kernel: its quantization stays a kernel of its own, reported
    assert (res.matched, res.rewritten) == (3, 2)
    assert [(nf.candidate, nf.fqn, nf.reason) for nf in ctx.not_fused] == [
        ("quantize_per_token of call_function add.Tensor", "fc1",
         "no fused kernel for this producer: quantization runs as its own kernel")]


def test_fuse_gemm_dequant_and_epilogue():
    b, a, res, gm, ctx = before_and_after(Block(), inputs(), "w8a8", "fuse_gemm_dequant")
    assert res.rewritten == 5 and count(gm, zq.int8_gemm_dequant.default) == 5
    assert count(gm, aten.linear.default) == 0 and count(gm, zq.dequantize_weight.default) == 0
    assert torch.allclose(a, b, atol=1e-5)
    b2, a2, res2, gm2, ctx2 = before_and_after(Block(), inputs(), "w8a8", "fuse_gemm_epilogue")
    # v_proj(y) + q*k and fc2(..) + h: both adds of a same-shape tensor go into the GEMM epilogue
    assert [(f.kind, f.fqn) for f in ctx2.fusions if f.kind.startswith("epilogue")] == [
        ("epilogue:residual", "v_proj"), ("epilogue:residual", "fc2")]
    assert torch.allclose(a2, b2, atol=1e-5)
    # A16: GeLU goes into fc1's epilogue (no quant consumes it)
    b3, a3, _, gm3, ctx3 = before_and_after(Block(), inputs(), "w8a16", "fuse_gemm_epilogue")
    assert sorted(f.kind for f in ctx3.fusions if f.kind.startswith("epilogue")) == [
        "epilogue:gelu", "epilogue:residual", "epilogue:residual"]
    assert count(gm3, zq.weight_only_gemm.default) == 5 and count(gm3, aten.gelu.default) == 0
    assert torch.allclose(a3, b3, atol=1e-5)


def test_float_weights_are_freed_when_quantized():
    """group_wise_weight drops each float weight as it replaces it (the compile's peak then holds one at a
    time, not every concatenated q/k/v and gate/up weight); cleanup finds none left to free."""
    b, a, res, gm, ctx = before_and_after(Block(), inputs(), "w8a8", "group_wise_weight")
    names = {n for n, _ in gm.named_parameters()}
    assert not any(n.endswith(("q_proj.weight", "fc1.weight", "fc2.weight")) for n in names)
    assert any(n.endswith("ln.weight") for n in names)  # still used by the fused LayerNorm
    assert not any(n.op == "get_attr" and not n.users for n in gm.graph.nodes)
    b, a, res, gm, ctx = before_and_after(Block(), inputs(), "w8a8", "cleanup")
    assert res.rewritten == 0 and torch.equal(a, b)


def test_simplify_attention_masks_shape_only_masks_only():
    import zqcompile as zq
    from zqcompile.models import tiny_model
    for family, kind in (("bert", False), ("llama", True)):
        m = tiny_model(family)
        e = zq.compile(m, (torch.randint(0, 1000, (2, 8)),), "none")
        sdpa = [n for n in e.gm.graph.nodes if n.target == aten.scaled_dot_product_attention.default]
        assert len(sdpa) == 2 and all(len(n.args) == 3 and n.kwargs["is_causal"] is kind for n in sdpa)
        x = torch.randint(0, 1000, (3, 11))
        out, ref = e(x), m(x)
        key = "logits" if family == "llama" else "last_hidden_state"
        assert torch.allclose(getattr(out, key), getattr(ref, key), atol=1e-5)
    # a real attention_mask input is data: its mask stays
    m = tiny_model("bert")
    ids, mask = torch.randint(0, 1000, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    e = zq.compile(m, (ids, mask), "none")
    sdpa = [n for n in e.gm.graph.nodes if n.target == aten.scaled_dot_product_attention.default]
    assert all(len(n.args) == 4 for n in sdpa)
    assert torch.allclose(e(ids, mask).last_hidden_state, m(ids, mask).last_hidden_state, atol=1e-5)


def test_fuse_gemm_epilogue_reports_residuals_it_cannot_take():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b, self.c = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
            self.row = nn.Parameter(torch.randn(32))

        def forward(self, x, r):
            h = self.c(x)
            return (self.a(x) + self.row) + (self.b(x) + r * 3) + (h + h)

    b, a, res, gm, ctx = before_and_after(M(), inputs(), "w8a16", "fuse_gemm_epilogue")
    assert (res.matched, res.rewritten) == (3, 0) and count(gm, zq.weight_only_gemm.default) == 3
    assert [(nf.candidate, nf.fqn, nf.reason) for nf in ctx.not_fused] == [
        ("residual add", "c", "residual is computed after the GEMM"),  # h + h: the GEMM itself
        ("residual add", "a", "the other operand is not a same-shape tensor"),  # a broadcast row
        ("residual add", "b", "residual is computed after the GEMM")]  # r * 3 comes after the GEMM
    assert torch.allclose(a, b, atol=1e-5)


class GemmaStyle(nn.Module):
    """Gemma's RMSNorm (scale 1 + weight) in front of a tanh-GeLU-gated MLP."""

    def __init__(self, d: int = 32):
        super().__init__()
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
        torch.manual_seed(0)
        self.norm = Gemma3RMSNorm(d, 1e-6)
        nn.init.normal_(self.norm.weight, std=0.5)
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, r):
        h = self.norm(x + r)
        return self.down_proj(torch.nn.functional.gelu(self.gate_proj(h), approximate="tanh") * self.up_proj(h))


def test_gemma_rmsnorm_folds_with_one_plus_weight_and_gated_gelu_fuses():
    m = GemmaStyle()
    b, a, res, gm, _ = before_and_after(m, inputs(), "w8a8", "fold_decomposed_ops")
    assert res.rewritten == 1 and count(gm, aten.rms_norm.default) == 1 and count(gm, aten.rsqrt.default) == 0
    norm = next(n for n in gm.graph.nodes if n.target == aten.rms_norm.default)
    weight = getattr(gm, norm.args[2].target)
    assert torch.equal(weight, m.norm.weight + 1.0) and norm.args[2].meta["zq_param"] == "norm.weight"
    assert torch.allclose(a, m(*inputs()), atol=1e-6) and torch.allclose(a, b, atol=1e-6)
    b, a, _, gm, ctx = before_and_after(m, inputs(), "w8a8", "fuse_producer_quant")
    assert count(gm, zq.norm_quant.default) == 1 and count(gm, zq.act_quant.default) == 1
    act = next(n for n in gm.graph.nodes if n.target == zq.act_quant.default)
    assert act.args[2] is not None and act.args[3] == "gelu_tanh"  # gelu_tanh(gate) * up, as one kernel
    assert sorted(f.kind for f in ctx.fusions) == ["add+rmsnorm+quant", "gelu_tanh+quant"]
    assert torch.equal(a, b)


class RowView(nn.Module):
    """A norm whose output is flattened to [tokens, d] before its GEMM (Mixtral's MoE input) and also read in
    float by another GEMM."""

    def __init__(self, d: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.fc1, self.gate = nn.RMSNorm(d, eps=1e-6), nn.Linear(d, 2 * d), nn.Linear(d, 4)

    def forward(self, x, r):
        h = self.norm(x + r).view(-1, x.shape[-1])
        return self.fc1(h).view(*x.shape[:-1], -1), self.gate(h)


def test_quantization_moves_before_a_row_preserving_view_and_fuses_into_the_norm():
    cfg = get_config("w8a8").with_overrides({r"^gate$": "fp"})
    b, a, res, gm, ctx = before_and_after(RowView(), inputs(), cfg, "fuse_producer_quant")
    assert count(gm, zq.norm_quant.default) == 1 and count(gm, zq.quantize_per_token.default) == 0
    assert any("moved before a row-preserving view" in note for note in res.notes)
    nq = next(n for n in gm.graph.nodes if n.target == zq.norm_quant.default)
    assert nq.args[6] is True  # the float norm output still feeds the FP GEMM through the view
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_stacked_experts_are_captured_dense_one_gemm_per_expert_and_router_fp():
    """Mixtral's MoE block: each expert's slice of the stacked weights becomes a GEMM of its own with a
    constant weight named per expert; the GEMM that feeds top-k is the router, FP in every preset."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    cfg = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=3, num_experts_per_tok=2)
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(cfg).eval()
    for p in block.parameters():
        nn.init.normal_(p, std=0.2)
    x = inputs()[0]
    gm = captured(block, x)
    ctx = PassContext(get_config("w8a8"), (x,))
    run_until(gm, ctx, "classify_gemms")
    plan = {g.fqn: g for g in ctx.gemms}
    assert sorted(plan) == ["experts.0.down_proj", "experts.0.gate_up_proj", "experts.1.down_proj",
                            "experts.1.gate_up_proj", "experts.2.down_proj", "experts.2.gate_up_proj", "gate"]
    assert plan["gate"].role == "router" and plan["gate"].scheme.is_float
    assert {plan[f"experts.{e}.{p}"].role for e in range(3) for p in ("gate_up_proj", "down_proj")} == {"fc1", "fc2"}
    assert not plan["experts.1.down_proj"].scheme.is_float
    with torch.no_grad():
        assert torch.allclose(gm(x), block(x), atol=1e-6)  # dense: an unchosen expert adds exactly zero
    assert cfg._experts_implementation is None  # as it was before the capture
