"""compressed-tensors export of every decoder family (tests/test_decoder_families.py's tiny models and W8A8
engines): the folder holds the tensors under the names transformers saves the model with (Phi-3's fused
qkv_proj / gate_up_proj as they are, Mixtral's experts as one Linear layer per expert and projection), loads in
transformers with the W8A16 numerics of the engine's weights, and imports back onto the engine bit for bit.

Mixtral: transformers 5.24 loads quantized experts only packed (pack-quantized) or FP8 (its
CompressedTensorsDequantize), so its W8A8 folder (int-quantized experts, the layout vLLM's W8A8 MoE reads) is
checked by its names and the import, and the W8A16 engine's folder (pack-quantized) is the one loaded in
transformers.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import zqcompile as zq
from tests.conftest import dequantized_load_quantizes_activations, ids, rel_err
from tests.test_decoder_families import w8a8
from zqcompile.errors import ExportError
from zqcompile.experts import is_stacked_experts
from zqcompile.models import DECODER_FAMILIES, tiny_model
from zqcompile.ops import quant_math as qm

pytest.importorskip("compressed_tensors", reason="pip install compressed-tensors (the test extra)")

X = ids(2, 12, seed=3)
COMPANIONS = (".weight_scale", ".weight_shape")  # next to a quantized layer's .weight / .weight_packed


def _hf(folder, dequantize: bool):
    import transformers as T
    kw = {"quantization_config": T.CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return T.AutoModelForCausalLM.from_pretrained(folder, **kw).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


def _w8a16(model: nn.Module) -> nn.Module:
    """The float model with every Linear but the head, and every stacked expert, computing with zqcompile's
    per-row INT8 weight dequantize(quantize(W)) and float activations."""
    ref = copy.deepcopy(model)
    weights = [m.weight for n, m in ref.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    weights += [p for m in ref.modules() if is_stacked_experts(m) for p in m.parameters(recurse=False)]
    with torch.no_grad():
        for w in weights:
            rows = w.reshape(-1, w.shape[-1])
            q, s = qm.quantize_weight(rows, 8)
            w.copy_(qm.dequantize_weight(q, s, 8, w.dtype).reshape(w.shape))
    return ref


def _saved_names(model: nn.Module, tmp) -> set[str]:
    model.save_pretrained(tmp / "float")
    return set(load_file(os.path.join(tmp / "float", "model.safetensors")))


def _export(engine, folder):
    """zq.export_compressed_tensors, or None where transformers < 5.24 (5.17, the H200 image, checked) saves a
    model's stacked experts as per-expert vectors the export cannot fill from whole rows: there the user gets one
    line (cause, what to do) and nothing is written; 5.24 saves whole expert layers."""
    try:
        return zq.export_compressed_tensors(engine, folder)
    except ExportError as e:
        import transformers
        if tuple(int(v) for v in transformers.__version__.split(".")[:2]) >= (5, 24):
            raise
        assert "not as whole rows of one expert's Linear layer" in str(e) and "export to ONNX instead" in str(e)
        assert not os.path.exists(folder)
        return None


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_family_folder_loads_in_transformers_and_imports_back(family, tmp_path):
    model, engine = w8a8(family)
    out = _export(engine, tmp_path / "ct")
    if out is None:
        return
    sd = load_file(os.path.join(out, "model.safetensors"))
    # the names transformers saves the float model with, each quantized layer's scale next to its weight
    names = {k.removesuffix("_packed") for k in sd if not k.endswith(COMPANIONS)}
    assert names == _saved_names(model, tmp_path)
    quantized = {k.removesuffix(".weight_scale") for k in sd if k.endswith(".weight_scale")}
    assert all(sd[f"{q}.weight"].dtype == torch.int8 for q in quantized)
    if family == "phi3":  # the model's own fused layers, not split
        assert {"model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"} <= quantized
        assert not any("q_proj" in k or "up_proj." in k.replace("gate_up_proj.", "") for k in sd)
    if family.startswith("gemma"):  # the (1 + w) norms written as the model's w (the engine holds 1 + w)
        norms = [k for k in sd if k.endswith("norm.weight")]
        params = dict(model.named_parameters())
        assert norms and all((sd[k] - params[k]).abs().max() < 1e-6 for k in norms)

    ref = _logits(_w8a16(model))
    if family == "mixtral":  # see the module docstring: the W8A16 engine's folder is the one transformers loads
        assert len(quantized) == 4 + 3 * 4  # q/k/v/o + w1/w2/w3 per expert (the router stays float)
        w8a16 = zq.compile(model, (ids(2, 16),), "w8a16", generation=False)
        dense_model = _hf(zq.export_compressed_tensors(w8a16, tmp_path / "w8a16"), dequantize=True)
    else:
        dense_model = _hf(out, dequantize=True)
        a8 = rel_err(_logits(_hf(out, dequantize=False)), engine(X).logits)  # + compressed-tensors' own A8
        print(f"{family}: rel. L2 |transformers as stored - engine| = {a8:.4f}")
        assert a8 < 0.03
    dense = _logits(dense_model)
    err = float((dense - ref).abs().max() / ref.abs().max())
    print(f"{family}: max |transformers dequantized - W8A16 reference| / max |logit| = {err:.2e}")
    # exact where transformers drops the activation scheme on dequantize (5.24); 5.17 still quantizes them
    assert err <= (3e-2 if dequantized_load_quantizes_activations(dense_model) else 1e-5)
    if family.startswith("gemma"):  # the embedding scale is the config's, as in the model
        assert torch.equal(_hf(out, dequantize=True).model.embed_tokens.embed_scale,
                           model.model.embed_tokens.embed_scale)

    _check_import(family, out, model, engine)


def _check_import(family: str, out: str, model: nn.Module, engine) -> None:
    """The folder imported back: the engine's integer weights and scales part by part and the model's float
    tensors; compiled and run (bit for bit the engine's logits) where the import does more than read names
    (Gemma's 1 + w norms, Mixtral's per-expert layers stacked back), the compile being ~6 s a family."""
    from zqcompile.export.compressed_tensors_import import load_compressed_tensors
    from zqcompile.runtime.enginefile import constant_key
    imported, _, stored = load_compressed_tensors(out)
    constants = {constant_key(n.target): n.target for n in engine.gm.graph.nodes if n.op == "get_attr"}
    for g in engine.record.gemms:
        if g["scheme_spec"]["weight"] is not None:
            c = g["constants"]
            assert torch.equal(torch.cat([stored[fqn].values for fqn, _ in g["parts"]]),
                               getattr(engine.gm, constants[c["weight"]])), g["fqn"]
            assert torch.equal(torch.cat([stored[fqn].scale for fqn, _ in g["parts"]]),
                               getattr(engine.gm, constants[c["weight_scale"]])), g["fqn"]
    floats = dict(imported.named_parameters())
    for name, p in model.named_parameters():
        if p.dim() == 1 or "embed" in name:
            assert (floats[name] - p).abs().max() <= 1e-6, name
    if family in ("gemma2", "mixtral"):
        again = zq.import_compressed_tensors(out, generation=False)
        assert [g["scheme"] for g in again.record.gemms] == [g["scheme"] for g in engine.record.gemms]
        assert torch.equal(again(X).logits, engine(X).logits)


def test_qwen2_moe_compiles_and_exports(tmp_path):
    """Qwen2-MoE (zqcompile.models.MOE_FAMILIES; Qwen3-MoE is the same experts block without the shared expert,
    checked by hand, README): captured in the dense experts form, the router and the shared expert's sigmoid gate
    float, every expert and the shared expert INT8 (the shared expert's gate/up merged with the experts' into one
    GEMM: one input); exported as Qwen's per-expert gate_proj / up_proj / down_proj and read back."""
    model = tiny_model("qwen2_moe", layers=1)
    engine = zq.compile(model, (ids(2, 16),), "w8a8", generation=False)
    x = ids(3, 20, seed=7)
    with torch.no_grad():
        err = rel_err(engine(x).logits, model(x).logits)
    assert 1e-6 < err < 0.03, err
    plan = {g["fqn"]: (g["role"], g["kernel"]) for g in engine.record.gemms}
    for gate in ("model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate"):
        assert plan.pop(gate) == ("router", "aten.linear")
    assert plan.pop("lm_head") == ("head", "aten.linear")
    assert set(plan.values()) == {(r, "zq.int8_gemm_dequant") for r in ("qkv", "attn_out", "fc1", "fc2")}
    assert len(plan) == 3 + 4 + 1  # q/k/v, o_proj, the merged gate/up; 4 experts' and the shared down_proj
    out = _export(engine, tmp_path / "ct")
    if out is None:
        return
    sd = load_file(os.path.join(out, "model.safetensors"))
    assert {k.removesuffix("_packed") for k in sd if not k.endswith(COMPANIONS)} == _saved_names(model, tmp_path)
    assert sd["model.layers.0.mlp.experts.3.up_proj.weight"].dtype == torch.int8
    assert sd["model.layers.0.mlp.shared_expert_gate.weight"].dtype == torch.float32
    _check_import("qwen2_moe", out, model, engine)


def test_an_older_gemma_engine_is_refused(tmp_path):
    """An engine whose record lacks the (1 + w) norms' offsets (saved by an earlier zqcompile) would write 1 + w."""
    import dataclasses
    _, engine = w8a8("gemma3")
    old = copy.copy(engine)
    old.record = dataclasses.replace(engine.record, parameter_offsets={})
    with pytest.raises(zq.ExportError, match=r"\(1 \+ weight\) norms \(Gemma\).*compile the model again"):
        zq.export_compressed_tensors(old, tmp_path / "ct")
    assert os.listdir(tmp_path) == []
