"""The whole pipeline on small random-init BERT, GPT-2, OPT and LLaMA models: every preset compiles, output
error vs fp32 eager is bounded, and the fused op counts are what the method says they should be."""
import pytest
import torch
from torch import nn

import zqcompile as zq

from .conftest import engine_for, ids, main_output, model_for, rel_err

FAMILIES = ["bert", "gpt2", "opt", "llama"]
PRESETS = ["w8a8", "w4/8a8", "w4/8a16", "w8a8/16", "w8a16", "ptq-static", "none"]
# bounds on the relative L2 error of logits / hidden states vs fp32 eager (2-layer, hidden 64, random init)
BOUND = {"w8a8": 0.03, "w8a16": 0.03, "w8a8/16": 0.03, "ptq-static": 0.05, "w4/8a8": 0.25, "w4/8a16": 0.25,
         "none": 1e-5}

zqops = torch.ops.zq


def ops_count(engine, op) -> int:
    return sum(1 for n in engine.gm.graph.nodes if n.op == "call_function" and n.target == op)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_compiles_and_is_close_to_fp32(family, preset):
    engine = engine_for(family, preset)
    x = ids(3, 24, seed=7)  # another batch and length than captured: dynamic shapes
    with torch.no_grad():
        ref = main_output(model_for(family)(x))
    err = rel_err(main_output(engine(x)), ref)
    assert err < BOUND[preset], f"{family} {preset}: rel err {err:.4f}"
    if preset != "none":
        assert err > 1e-6  # it really is quantized


@pytest.mark.parametrize("family", FAMILIES)
def test_w8a8_error_well_under_w4_8a8(family):
    x = ids(2, 20, seed=3)
    with torch.no_grad():
        ref = main_output(model_for(family)(x))
    e8 = rel_err(main_output(engine_for(family, "w8a8")(x)), ref)
    e4 = rel_err(main_output(engine_for(family, "w4/8a8")(x)), ref)
    assert e8 * 2.5 < e4


# (int8 GEMMs, fused norm+quant, fused act+quant) for the 2-layer models; the head stays FP in presets.
# Per layer: one merged q/k/v GEMM (GPT-2's c_attn already is one), out-proj, fc1 (LLaMA: merged gate/up), fc2.
EXPECTED = {"bert": (8, 4, 2), "gpt2": (8, 4, 2), "opt": (8, 4, 2), "llama": (8, 4, 2)}


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_op_counts_w8a8(family):
    e = engine_for(family, "w8a8")
    gemms, norms, acts = EXPECTED[family]
    assert ops_count(e, zqops.int8_gemm_dequant.default) == gemms
    assert ops_count(e, zqops.norm_quant.default) == norms
    assert ops_count(e, zqops.act_quant.default) == acts
    assert ops_count(e, torch.ops.aten.linear.default) == 1  # the head
    assert ops_count(e, zqops.dequantize_weight.default) == 0 and ops_count(e, zqops.dequantize_per_token.default) == 0
    kind = {"bert": "layernorm", "gpt2": "layernorm", "opt": "layernorm", "llama": "rmsnorm"}[family]
    kinds = {f["kind"] for f in e.record.fusions}
    assert f"add+{kind}+quant" in kinds
    assert {"gelu+quant", "gelu_tanh+quant", "relu+quant", "silu+quant"} & kinds


def test_w4_8a8_uses_int4_only_in_the_mlp():
    e = engine_for("opt", "w4/8a8")
    bits = {}
    for n in e.gm.graph.nodes:
        if n.op == "call_function" and n.target == zqops.int8_gemm_dequant.default:
            bits[n.meta["zq_gemm"].fqn] = n.args[7]
    assert {f for f, b in bits.items() if b == 4} == {f"model.decoder.layers.{i}.{fc}" for i in (0, 1) for fc in ("fc1", "fc2")}
    assert all(b == 8 for f, b in bits.items() if "self_attn" in f)


def test_w8a8_16_keeps_qkv_input_in_float():
    e = engine_for("llama", "w8a8/16")
    for n in e.gm.graph.nodes:
        info = n.meta.get("zq_gemm")
        if n.op == "call_function" and info is not None and n.target in (
                zqops.int8_gemm_dequant.default, zqops.weight_only_gemm.default):
            expect = zqops.weight_only_gemm.default if info.role == "qkv" else zqops.int8_gemm_dequant.default
            assert n.target == expect, info.fqn


def test_overrides_keep_named_gemms_in_fp():
    model = model_for("gpt2")
    cfg = zq.get_config("w8a8").with_overrides({r"h\.1\.mlp": "fp16", r"attn\.c_attn$": "fp"})
    e = zq.compile(model, (ids(2, 16),), cfg, generation=False)
    kernels = {g["fqn"]: g["kernel"] for g in e.record.gemms}
    assert kernels["transformer.h.1.mlp.c_fc"] == "aten.linear" and kernels["transformer.h.1.mlp.c_proj"] == "aten.linear"
    assert kernels["transformer.h.0.attn.c_attn"] == "aten.linear"
    assert kernels["transformer.h.0.mlp.c_fc"] == "zq.int8_gemm_dequant"
    fp16_linears = [n for n in e.gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default
                    and n.args[1].op == "call_function"]  # weight cast to fp16 in front of the GEMM
    assert len(fp16_linears) == 2
    assert "override" in next(g["rule"] for g in e.record.gemms if g["fqn"] == "transformer.h.1.mlp.c_fc")
    x = ids(2, 16, seed=5)
    assert rel_err(e(x).logits, model(x).logits) < BOUND["w8a8"]


def test_type_override_by_module_class():
    from transformers.models.bert.modeling_bert import BertSelfAttention
    cfg = zq.get_config("w8a8").with_overrides({BertSelfAttention: "fp"})
    e = zq.compile(model_for("bert"), (ids(2, 16),), cfg)
    for g in e.record.gemms:
        assert (g["kernel"] == "aten.linear") == (g["role"] in ("qkv", "head")), g


def test_static_baseline_quant_nodes_are_reported_unfused():
    e = engine_for("bert", "ptq-static")
    reasons = [n for n in e.record.not_fused if n["candidate"] == "quantize_per_tensor"]
    assert len(reasons) == sum(1 for n in e.gm.graph.nodes if n.target == zqops.quantize_per_tensor.default) > 0


def test_outputs_keep_the_model_output_type():
    out = engine_for("gpt2", "w8a8")(ids(1, 5))
    assert type(out).__name__ == "CausalLMOutputWithCrossAttentions" and out.logits.shape == (1, 5, 1000)


class OutlierMLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_static_ptq_is_visibly_worse_than_token_wise_on_outlier_tokens():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, 64, generator=g)
    x[:, ::8] *= 40.0  # every 8th token is an outlier token, as in the paper's Figure 1
    m = OutlierMLP().eval()
    ref = m(x)
    static = zq.compile(m, (x,), "ptq-static", calibration_data=[(x,)], generation=False)
    token = zq.compile(m, (x,), "w8a8", generation=False)
    normal = [i for i in range(32) if i % 8]
    e_static = rel_err(static(x)[:, normal], ref[:, normal])
    e_token = rel_err(token(x)[:, normal], ref[:, normal])
    assert e_token < 0.02 and e_static > 5 * e_token, (e_token, e_static)


def test_save_load_roundtrip_is_bit_exact(tmp_path):
    for family, preset in [("bert", "w8a8"), ("llama", "w4/8a8"), ("gpt2", "ptq-static")]:
        e = engine_for(family, preset)
        path = tmp_path / f"{family}.zq"
        e.save(path)
        e2 = zq.load(path)
        x = ids(3, 11, seed=9)
        assert torch.equal(main_output(e2(x)), main_output(e(x)))
        assert e2.report() == e.report()
    assert [p.name for p in tmp_path.iterdir()] and not any(p.name.startswith(".zq-") for p in tmp_path.iterdir())
