"""FP8 E4M3 mode (issue 14 item 2): the config, the quantization formulas, and engines of the presets "fp8" (FP8
weights per row, FP8 activations per token) and "w8a8-fp8act" (INT8 weights, FP8 activations) on tiny random-init
models, against the fake-quantized model (the same formulas, module by module) and fp32; save / load in a fresh
process. ONNX: tests/backends/test_onnx_fp8.py; compressed-tensors: tests/test_compressed_tensors.py; GPU:
tests/gpu/test_fp8_gpu.py."""
from __future__ import annotations

import copy

import pytest
import torch

import zqcompile as zq
from tests.conftest import engine_for, ids, main_output, model_for, rel_err
from zqcompile.accuracy.fakequant import fake_quantize
from zqcompile.config import ActQuant, ConfigError, GemmScheme, WeightQuant, get_config
from zqcompile.ops import quant_math as qm

zqop = torch.ops.zq


def count(engine, op) -> int:
    return sum(1 for n in engine.gm.graph.nodes if n.op == "call_function" and n.target == op)


# ---- config -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda: ActQuant("tensor", dtype="fp8"), r"ActQuant\(dtype='fp8'\) is dynamic per-token .* needs mode='token', "
                                              r"got mode='tensor'"),
    (lambda: ActQuant(dtype="fp16"), r"ActQuant\.dtype must be one of 'int', 'fp8', got 'fp16'"),
    (lambda: WeightQuant(4, "k_groups", dtype="fp8"), r"WeightQuant\(dtype='fp8'\) .* needs bits=8 and "
                                                       r"granularity='row_groups' without num_groups, got bits=4"),
    (lambda: WeightQuant(8, num_groups=4, dtype="fp8"), r"without num_groups, .*num_groups=4"),
    (lambda: GemmScheme(WeightQuant(dtype="fp8"), ActQuant("token")), r"FP8 weights need FP8 activations"),
    (lambda: GemmScheme(WeightQuant(dtype="fp8"), ActQuant("none")), r"FP8 weights need FP8 activations"),
    (lambda: GemmScheme(WeightQuant(4, "k_groups"), ActQuant(dtype="fp8")), r"FP8 activations take FP8 or INT8 "
                                                                            r"weights, got INT4"),
])
def test_bad_fp8_configs_say_so_in_one_line(make, message):
    with pytest.raises(ConfigError, match=message) as e:
        make()
    assert "\n" not in str(e.value)


def test_fp8_presets_and_scheme_names():
    fp8, mixed = get_config("fp8"), get_config("w8a8-fp8act")
    assert fp8.default.describe() == "W: FP8 E4M3 per-row | A FP8 E4M3 per-token"
    assert mixed.default.describe() == "W: INT8 per-row | A FP8 E4M3 per-token"
    assert fp8.roles["head"].is_float and mixed.roles["head"].is_float
    assert get_config("w8a8").with_overrides({"mlp": "fp8"}).overrides[0][1] == "fp8"


# ---- formulas -----------------------------------------------------------------------------------------------
def test_fp8_token_quantization_is_the_saturated_e4m3_cast():
    x = torch.randn(4, 48, generator=torch.Generator().manual_seed(0)) * 3
    x[1] *= 100.0
    x[2] = 0.0
    q, s = qm.quantize_per_token_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (4, 1)
    amax = x.abs().amax(-1, keepdim=True).clamp_min(qm.EPS)
    assert torch.equal(s, amax / 448.0)
    assert torch.equal(q.float(), (x * (448.0 / amax)).clamp(-448, 448).to(torch.float8_e4m3fn).float())
    assert q[:2].float().abs().amax(-1).tolist() == [448.0, 448.0] and not q[2].float().any()
    # E4M3 keeps 3 mantissa bits: every dequantized value is within 2^-4 of its input, relative
    back = qm.dequantize_rows(q, s, torch.float32)
    normal = x.abs() > amax * 2 ** -6
    assert ((back - x).abs() <= x.abs() * 2 ** -4 + 1e-12)[normal].all()


def test_fp8_weights_one_scale_per_row_and_chunking_changes_nothing():
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    w[3] *= 50
    q, s = qm.quantize_weight_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (40, 1)
    assert torch.equal(s, w.abs().amax(1, keepdim=True) / 448.0)
    q2, s2 = qm.quantize_weight_fp8(w, chunk_elems=24 * 3)
    assert torch.equal(q.float(), q2.float()) and torch.equal(s, s2)
    # a row-parallel shard (K slice) keeps the full rows' scales
    qs, ss = qm.quantize_weight_fp8_shard(w, w[:, 8:16], 1, 8)
    assert torch.equal(ss, s) and torch.equal(qs.float(), q[:, 8:16].float())


# ---- engines ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_fp8_engine_is_the_fake_quantized_model(family):
    """Engine (fused FP8 producers, the FP8 GEMM) = the module-level fake quantization up to fp rounding, and
    within a bound of fp32; every quantized GEMM runs as zq.fp8_gemm_dequant."""
    model, engine = model_for(family), engine_for(family, "fp8")
    x = ids(3, 11, seed=4)
    with torch.no_grad():
        ref, fq = main_output(model(x)), main_output(fake_quantize(copy.deepcopy(model), "fp8")(x))
        out = main_output(engine(x))
    assert rel_err(out, fq) < 1e-5
    assert 1e-5 < rel_err(out, ref) < 0.05
    quantized = [g for g in engine.record.gemms if g["scheme_spec"]["weight"]]
    assert quantized and {g["kernel"] for g in quantized} == {"zq.fp8_gemm_dequant"}
    assert count(engine, zqop.int8_gemm_dequant.default) == 0 == count(engine, zqop.norm_quant.default)
    fused = count(engine, zqop.norm_quant_fp8.default) + count(engine, zqop.act_quant_fp8.default)
    # llama: per layer 2 RMSNorms + the gated SiLU; BERT: the embeddings' LayerNorm, per layer the attention
    # output's LayerNorm and the GeLU, the first layer's output LayerNorm (the last one feeds the FP pooler)
    assert fused == 6
    report = engine.report()
    assert "W: FP8 E4M3 per-row | A FP8 E4M3 per-token" in report and "no CUDA kernel fuses this yet" not in report


def test_int8_weights_fp8_activations_run_the_a16_gemm_on_fp8_rounded_inputs():
    model, engine = model_for("llama"), engine_for("llama", "w8a8-fp8act")
    x = ids(3, 11, seed=4)
    with torch.no_grad():
        fq = main_output(fake_quantize(copy.deepcopy(model), "w8a8-fp8act")(x))
        out, ref = main_output(engine(x)), main_output(model(x))
    assert rel_err(out, fq) < 1e-5 and 1e-5 < rel_err(out, ref) < 0.05
    assert count(engine, zqop.weight_only_gemm.default) == 8 and count(engine, zqop.norm_quant_fp8.default) == 4
    assert count(engine, zqop.dequantize_per_token.default) == 8  # one per GEMM input kept, reported
    assert all(n.args[0].meta["val"].dtype == torch.float8_e4m3fn
               for n in engine.gm.graph.nodes if n.target == zqop.dequantize_per_token.default)
    assert "no GEMM multiplies FP8 by INT8" in engine.report()


def test_fp8_constants_are_saved_as_e4m3(tmp_path):
    """Saved and loaded bit for bit (a fresh process loads it too: tests/test_engine_files.py)."""
    engine = engine_for("llama", "fp8")
    engine.save(tmp_path / "fp8.zq")
    loaded = zq.load(tmp_path / "fp8.zq")
    fp8 = [k for k, t in loaded.gm.state_dict().items() if t.dtype == torch.float8_e4m3fn]
    assert len(fp8) == 8 and all(k.endswith("_wq") for k in fp8)
    x = ids(2, 9, seed=5)
    assert torch.equal(main_output(loaded(x)), main_output(engine(x)))


def test_gemma_gated_gelu_fp8_and_a_mixed_plan():
    """Gemma's tanh-GeLU gate fuses with the FP8 quantization; fp8 on the MLP only, INT8 elsewhere."""
    model = model_for("gemma2")
    cfg = get_config("w8a8").with_overrides({r"mlp\.": "fp8"})
    engine = zq.compile(model, (ids(2, 16),), cfg, generation=False)
    x = ids(2, 12, seed=6)
    with torch.no_grad():
        fq = main_output(fake_quantize(copy.deepcopy(model), cfg)(x))
        out = main_output(engine(x))
    assert rel_err(out, fq) < 1e-4
    assert count(engine, zqop.act_quant_fp8.default) == 2 and count(engine, zqop.fp8_gemm_dequant.default) == 4
    assert count(engine, zqop.int8_gemm_dequant.default) == 4
