"""Decoder families beyond LLaMA on tiny random-init models (hidden 64, vocab 1000; zqcompile.models.tiny_model):
Qwen2, Qwen3 (q/k RMSNorm), Mistral (sliding window 8), Gemma 2 / 3 ((1 + weight) RMSNorms, soft-capping,
local and global layers), Phi-3 (fused qkv_proj / gate_up_proj), Mixtral (4 routed experts, 2 per token).

Per family: every other preset's pass pipeline runs on one capture of a 1-layer model (capture does not depend
on the preset) and lands within the preset's error bound; W8A8 through zq.compile: logit error bounded, the
norm-quant / act-quant fusions counted, ONNX Runtime equal to the engine (the families whose graphs bring ops
the LLaMA-like ones do not); unquantized prefill logits equal Hugging Face's and greedy generation past the
window equals Hugging Face generate for 32 tokens, a left-padded row included. Gemma's models have 2 layers (one
local, one global), the others 1 (the CI time budget: each graph costs about 2 s to compile on 2 cores).
"""
from __future__ import annotations

import copy
import functools

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
LAYERS = {"gemma2": 2, "gemma3": 2}  # a local and a global layer; 1 elsewhere (every layer alike)
# Qwen2 / Qwen3 / Mistral bring no op the others' exports lack (q/k norms, sliding-window masks: Gemma 3; biases:
# GPT-2 / OPT in tests/backends): ONNX Runtime is compared on these
ONNX_FAMILIES = ("gemma2", "gemma3", "phi3", "mixtral")


def family_model(family: str):
    return tiny_model(family, layers=LAYERS.get(family, 1))


@functools.lru_cache(maxsize=None)
def _captured(family: str):
    """The family's 1-layer model and its capture, as zq.compile makes it (outputs flat)."""
    model = tiny_model(family, layers=1)
    gm, spec = capture(model, (ids(2, 16),))
    flatten_graph_outputs(gm)
    return model, gm, spec


def _pipeline(family: str, preset: str):
    """The preset's pipeline on a copy of the family's capture -> (model, graph returning flat outputs)."""
    model, gm, spec = _captured(family)
    gm = copy.deepcopy(gm)
    run_pipeline(gm, PassContext(get_config(preset), (ids(2, 16),), max_seq=spec.max_seq))
    return model, gm


# w8a8 / none: below; the FP8 presets: tests/test_fp8.py (Gemma's gated GeLU there)
@pytest.mark.parametrize("preset", [p for p in PRESETS if p not in ("w8a8", "none", "fp8", "w8a8-fp8act")])
@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_every_preset_compiles_within_its_bound(family, preset):
    model, gm = _pipeline(family, preset)
    x = ids(3, 20, seed=7)  # longer than the window, another shape than captured
    with torch.no_grad():
        err = rel_err(gm(x)[0], model(x).logits)
    assert err < BOUND[preset] * LOOSER.get(family, 1.0), f"{family} {preset}: {err:.4f}"
    assert err > 1e-6  # it really is quantized


@functools.lru_cache(maxsize=None)
def w8a8(family: str):
    """The W8A8 engine of the family's model (compiled once for the tests below)."""
    model = family_model(family)
    return model, zq.compile(model, (ids(2, 16),), "w8a8", generation=False)


def count(engine, op) -> int:
    return sum(1 for n in engine.gm.graph.nodes if n.op == "call_function" and n.target == op)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_w8a8_error_and_fusions(family):
    """Per layer q/k/v as one GEMM, o_proj, gate+up as one GEMM, down_proj, both norms fused with the
    quantization of their output (with the residual add but in the first), the gated activation with the down
    projection's input quantization. Mixtral: per expert a down_proj and a gated activation; the 4 experts'
    gate_up GEMMs merged (one input); the router stays an FP GEMM."""
    model, engine = w8a8(family)
    n = LAYERS.get(family, 1)
    x = ids(3, 20, seed=7)
    with torch.no_grad():
        err = rel_err(engine(x).logits, model(x).logits)
    assert 1e-6 < err < BOUND["w8a8"] * LOOSER.get(family, 1.0), err
    moe = family == "mixtral"
    per_layer = EXPERTS if moe else 1
    assert count(engine, zqops.int8_gemm_dequant.default) == n * (3 + per_layer)
    assert count(engine, zqops.norm_quant.default) == 2 * n
    assert count(engine, zqops.act_quant.default) == n * per_layer
    assert count(engine, torch.ops.aten.linear.default) == 1 + (n if moe else 0)  # the head (+ the routers)
    act = "gelu_tanh" if family.startswith("gemma") else "silu"
    kinds = [f["kind"] for f in engine.record.fusions]
    assert kinds.count(f"{act}+quant") == n * per_layer
    assert kinds.count("add+rmsnorm+quant") == 2 * n - 1 and kinds.count("rmsnorm+quant") == 1


def test_mixtral_router_stays_fp_and_each_expert_is_quantized():
    model, engine = w8a8("mixtral")
    plan = {g["fqn"]: g for g in engine.record.gemms}
    router = plan["model.layers.0.mlp.gate"]
    assert (router["role"], router["kernel"], router["rule"]) == ("router", "aten.linear", "w8a8 role router")
    for e in range(EXPERTS):
        down = plan[f"model.layers.0.mlp.experts.{e}.down_proj"]
        assert (down["role"], down["kernel"], down["shape"]) == ("fc2", "zq.int8_gemm_dequant", [64, 128])
    merged = plan["model.layers.0.mlp.experts." + "+".join(f"{e}.gate_up_proj" for e in range(EXPERTS))]
    assert (merged["role"], merged["kernel"]) == ("fc1", "zq.int8_gemm_dequant")
    assert merged["shape"] == [EXPERTS * 2 * 128, 64]
    assert model.config._experts_implementation == "grouped_mm"  # captured dense, the user's model as it was


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_unquantized_prefill_and_greedy_generation_equal_hf(family):
    """Prompts of 12 tokens (window 8), one row left-padded by 3, 32 new tokens. The generation graphs are built
    directly (as in test_sliding_window) to skip the full-sequence graph."""
    model = family_model(family)
    spec = CacheSpec(max_batch=2, max_cache_len=12 + NEW)
    gen = build_generator(model, get_config("none"), spec)
    prompt = ids(2, 12, seed=4)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    prompt = prompt.masked_fill(mask == 0, 0)
    assert prompt.shape[1] > TINY_WINDOW
    out = gen.generate(prompt, mask, NEW, SamplingParams(), None, None, None)
    want = model.generate(prompt, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert torch.equal(out, want)
    x = ids(2, 20, seed=5)
    kv_mask = torch.zeros(2, spec.max_cache_len, dtype=torch.long)
    kv_mask[:, :20] = 1
    with torch.no_grad():  # the prefill graph computes the last position's logits
        logits = gen.prefill(x, torch.arange(20).expand(2, 20), torch.arange(20), kv_mask)[0][:, -1]
        assert rel_err(logits, model(x).logits[:, -1]) < BOUND["none"]


@pytest.mark.parametrize("family", ONNX_FAMILIES)
def test_onnx_runtime_equals_engine(family, tmp_path):
    import onnxruntime as ort
    _, engine = w8a8(family)
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
