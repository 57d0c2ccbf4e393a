"""Decoder families beyond LLaMA on tiny random-init models (hidden 64, vocab 1000; zqcompile.models.tiny_model):
Qwen2, Qwen3 (q/k RMSNorm), Mistral (sliding window 8), Gemma 2 / 3 ((1 + weight) RMSNorms, soft-capping,
local and global layers), Phi-3 (fused qkv_proj / gate_up_proj), Mixtral (4 routed experts, 2 per token).

Per family: every preset's pass pipeline runs on one capture of a 1-layer model (capture does not depend on the
preset) and lands within the preset's error bound; W8A8 through zq.compile on the 2-layer model: logit error
bounded, the norm-quant / act-quant fusions counted, ONNX Runtime equal to the engine; unquantized greedy
generation past the window equals Hugging Face generate for 32 tokens, a left-padded row included.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import zqcompile as zq
from zqcompile.capture import capture
from zqcompile.config import PRESETS, get_config
from zqcompile.generation.generator import build_generator
from zqcompile.generation.kv_cache import CacheSpec
from zqcompile.generation.sampling import SamplingParams
from zqcompile.models import DECODER_FAMILIES, TINY_WINDOW, tiny_model
from zqcompile.passes import PassContext, run_pipeline
from zqcompile.runtime.outputs import flatten_graph_outputs

from .conftest import ids, rel_err

zqops = torch.ops.zq
NEW = 32
# relative L2 error of the logits vs fp32 Hugging Face; Gemma's GeLU MLP and soft-capped logits lose more
BOUND = {"w8a8": 0.03, "w8a8-fws": 0.03, "w8a16": 0.03, "w8a8/16": 0.03, "ptq-static": 0.05, "w4/8a8": 0.1,
         "w4/8a16": 0.1, "none": 1e-5}
LOOSER = {"gemma2": 2.0, "gemma3": 2.0}
EXPERTS = 4


def _pipeline(family: str, preset: str, cache: dict = {}):  # noqa: B006 - one capture per family
    """The preset's pipeline on a copy of the family's 1-layer capture -> (graph returning flat outputs, ctx)."""
    if family not in cache:
        model = tiny_model(family, layers=1)
        gm, spec = capture(model, (ids(2, 16),))
        flatten_graph_outputs(gm)
        cache[family] = model, gm, spec
    model, gm, spec = cache[family]
    gm = copy.deepcopy(gm)
    ctx = PassContext(get_config(preset), (ids(2, 16),), max_seq=spec.max_seq)
    run_pipeline(gm, ctx)
    return model, gm, ctx


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_every_preset_compiles_within_its_bound(family, preset):
    model, gm, _ = _pipeline(family, preset)
    x = ids(3, 20, seed=7)  # longer than the window, another shape than captured
    with torch.no_grad():
        err = rel_err(gm(x)[0], model(x).logits)
    assert err < BOUND[preset] * LOOSER.get(family, 1.0), f"{family} {preset}: {err:.4f}"
    assert preset == "none" or err > 1e-6  # it really is quantized


@pytest.fixture(scope="module", params=DECODER_FAMILIES)
def w8a8(request):
    model = tiny_model(request.param)
    return request.param, model, zq.compile(model, (ids(2, 16),), "w8a8", generation=False)


def count(engine, op) -> int:
    return sum(1 for n in engine.gm.graph.nodes if n.op == "call_function" and n.target == op)


def test_w8a8_error_and_fusions(w8a8):
    """2 layers: per layer q/k/v as one GEMM, o_proj, gate+up as one GEMM, down_proj, both norms fused with the
    quantization of their output, the gated activation with the down projection's input quantization.
    Mixtral: per expert a down_proj and a gated activation; the 4 experts' gate_up GEMMs merged (one input);
    the router stays an FP GEMM."""
    family, model, engine = w8a8
    x = ids(3, 20, seed=7)
    with torch.no_grad():
        err = rel_err(engine(x).logits, model(x).logits)
    assert 1e-6 < err < BOUND["w8a8"] * LOOSER.get(family, 1.0), err
    moe = family == "mixtral"
    assert count(engine, zqops.int8_gemm_dequant.default) == 2 * (3 + (EXPERTS if moe else 1))
    assert count(engine, zqops.norm_quant.default) == 4
    assert count(engine, zqops.act_quant.default) == 2 * (EXPERTS if moe else 1)
    assert count(engine, torch.ops.aten.linear.default) == 1 + (2 if moe else 0)  # the head (+ the routers)
    act = "gelu_tanh" if family.startswith("gemma") else "silu"
    kinds = [f["kind"] for f in engine.record.fusions]
    assert kinds.count(f"{act}+quant") == 2 * (EXPERTS if moe else 1)
    assert kinds.count("add+rmsnorm+quant") == 3 and kinds.count("rmsnorm+quant") == 1


def test_mixtral_router_stays_fp_and_each_expert_is_quantized():
    model, _, ctx = _pipeline("mixtral", "w8a8")
    plan = {g.fqn: g for g in ctx.gemms}
    router = plan["model.layers.0.mlp.gate"]
    assert router.role == "router" and router.scheme.is_float and router.kernel == "aten.linear"
    for e in range(EXPERTS):
        down = plan[f"model.layers.0.mlp.experts.{e}.down_proj"]
        assert down.role == "fc2" and down.kernel == "zq.int8_gemm_dequant"
    merged = plan["model.layers.0.mlp.experts." + "+".join(f"{e}.gate_up_proj" for e in range(EXPERTS))]
    assert merged.role == "fc1" and merged.shape == (EXPERTS * 2 * 128, 64)
    assert model.config._experts_implementation == "grouped_mm"  # captured dense, the user's model as it was


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_unquantized_greedy_generation_equals_hf(family):
    """Prompts of 12 tokens (window 8), one row left-padded by 3, 32 new tokens."""
    model = tiny_model(family)
    gen = build_generator(model, get_config("none"), CacheSpec(max_batch=2, max_cache_len=12 + NEW))
    prompt = ids(2, 12, seed=4)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    prompt = prompt.masked_fill(mask == 0, 0)
    assert prompt.shape[1] > TINY_WINDOW
    out = gen.generate(prompt, mask, NEW, SamplingParams(), None, None, None)
    want = model.generate(prompt, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert torch.equal(out, want)


def test_onnx_runtime_equals_engine(w8a8, tmp_path):
    import onnxruntime as ort
    family, _, engine = w8a8
    path = zq.export_onnx(engine, tmp_path / f"{family}.onnx")
    x = ids(3, 11, seed=1)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    want = engine(x).logits.numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_fake_quantization_refuses_stacked_experts_instead_of_leaving_them_float():
    from zqcompile.accuracy.fakequant import fake_quantize
    from zqcompile.errors import ConfigError
    with pytest.raises(ConfigError, match=r"stacked experts of 'model.layers.0.mlp.experts' \(MixtralExperts\).*"
                                          r"--path engine"):
        fake_quantize(tiny_model("mixtral", layers=1), "w8a8")
    fake_quantize(tiny_model("mixtral", layers=1), "none")  # nothing to quantize: nothing left float by mistake
