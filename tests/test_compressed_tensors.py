"""compressed-tensors checkpoints: the engine's weights exported as a Hugging Face folder that transformers loads
(with the `compressed-tensors` package, the `test` extra), and such folders -- ours and ones compressed-tensors
wrote itself -- imported to run on the engine with their stored integer weights (no re-quantization)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import zqcompile as zq
from tests.conftest import dequantized_load_quantizes_activations, ids, rel_err
from zqcompile.export import ct_format as ctf
from zqcompile.models import tiny_model
from zqcompile.ops import quant_math as qm
from zqcompile.runtime.enginefile import constant_key

ct = pytest.importorskip("compressed_tensors", reason="pip install compressed-tensors (the test extra)")

TEST_IDS = ids(2, 12, seed=3)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


_COMPILED: dict = {}


def _compile(config: str):
    """(float model, engine) of the tiny llama, compiled once per config for the whole module."""
    if config not in _COMPILED:
        model = tiny_model("llama")
        _COMPILED[config] = model, zq.compile(model, (ids(2, 16),), config, generation=False)
    return _COMPILED[config]


@pytest.fixture(scope="module")
def w8a8_folder(tmp_path_factory) -> str:
    return zq.export_compressed_tensors(_compile("w8a8")[1], tmp_path_factory.mktemp("w8a8") / "ct")


def _hf(folder, dequantize: bool = False):
    import transformers as T
    kw = {"quantization_config": T.CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return T.AutoModelForCausalLM.from_pretrained(folder, **kw).eval()


def _logits(model, x=TEST_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def _w_a16_reference(model, schemes: dict):
    """The float model whose quantized layers compute with dequantize(quantize(W)) (zqcompile's weight formula),
    float activations: what a checkpoint of the engine's weights computes without activation quantization."""
    import copy
    ref = copy.deepcopy(model)
    for name, mod in ref.named_modules():
        leaf = ".".join(name.split(".")[-2:])
        if leaf in LINEARS and schemes.get(leaf):
            bits, gran, size = schemes[leaf]
            q, s = qm.quantize_weight(mod.weight.detach(), bits, gran, None, size)
            mod.weight.data = qm.dequantize_weight(q, s, bits, torch.float32)
    return ref


def test_packing_is_compressed_tensors_packing():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    g = torch.Generator().manual_seed(0)
    for bits, k in ((4, 40), (4, 64), (8, 36)):
        lo = -(1 << (bits - 1))
        v = torch.randint(lo, -lo, (5, k), generator=g, dtype=torch.int8)
        packed = ctf.pack_int32(v, bits)
        assert torch.equal(packed, pack_to_int32(v, bits))
        assert torch.equal(ctf.unpack_int32(packed, bits, (5, k)), v)
        assert torch.equal(unpack_from_int32(packed, bits, torch.Size([5, k])), v)


def test_w8a8_folder(w8a8_folder):
    model, engine = _compile("w8a8")
    out = w8a8_folder
    config = json.load(open(os.path.join(out, "config.json")))
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    assert qc["ignore"] == ["lm_head"] and qc["quantization_status"] == "compressed"
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert group["weights"] == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                                "group_size": None, "dynamic": False}
    assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                          "group_size": None, "dynamic": True}
    sd = load_file(os.path.join(out, "model.safetensors"))
    assert not any("+" in k for k in sd)  # fused q/k/v and gate/up written back as the model's layers
    constants = {constant_key(n.target): n for n in engine.gm.graph.nodes if n.op == "get_attr"}
    for g in engine.record.gemms:
        if g["scheme_spec"]["weight"] is None:
            continue
        wq = getattr(engine.gm, constants[g["constants"]["weight"]].target)
        ws = getattr(engine.gm, constants[g["constants"]["weight_scale"]].target)
        r0 = 0
        for fqn, rows in g["parts"]:  # bit for bit the engine's values and scales, row by row
            assert sd[f"{fqn}.weight"].dtype == torch.int8 and sd[f"{fqn}.weight_scale"].dtype == torch.float32
            assert sd[f"{fqn}.weight_scale"].shape == (rows, 1)
            assert torch.equal(sd[f"{fqn}.weight"], wq[r0:r0 + rows])
            assert torch.equal(sd[f"{fqn}.weight_scale"], ws[r0:r0 + rows])
            r0 += rows
    assert sd["lm_head.weight"].dtype == torch.float32

    # dense load (dequantize=True): exactly the W8A16 numerics of the engine's weights (where transformers drops
    # the activation scheme; else only the W8A8 bound below holds: README's note ²)
    ref = _w_a16_reference(model, {leaf: (8, "row_groups", None) for leaf in LINEARS})
    dense_model = _hf(out, dequantize=True)
    dense = _logits(dense_model)
    if not dequantized_load_quantizes_activations(dense_model):
        assert (dense - _logits(ref)).abs().max() <= 1e-5 * _logits(ref).abs().max()
    # compressed load (compressed-tensors also quantizes the activations per token): close to the engine's W8A8
    engine_logits = engine(TEST_IDS).logits
    assert rel_err(_logits(_hf(out)), engine_logits) < 0.02
    assert rel_err(dense, engine_logits) < 0.03


def test_fp8_folder_is_float_quantized_and_transformers_runs_it(tmp_path):
    """FP8 weights per channel, dynamic FP8 per-token activations: compressed-tensors' float-quantized format,
    the engine's E4M3 values and scales as they are; transformers (compressed-tensors quantizing the activations
    per token as the engine does) computes the engine's logits."""
    model, engine = _compile("fp8")
    out = zq.export_compressed_tensors(engine, tmp_path / "ct")
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["format"] == "float-quantized" and qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert group["weights"] == {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
                                "group_size": None, "dynamic": False}
    assert group["input_activations"] == {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                                          "group_size": None, "dynamic": True}
    sd = load_file(os.path.join(out, "model.safetensors"))
    wq = {g["fqn"]: g for g in engine.record.gemms}["model.layers.0.self_attn.q_proj+k_proj+v_proj"]
    constants = {constant_key(n.target): n for n in engine.gm.graph.nodes if n.op == "get_attr"}
    values, scale = (getattr(engine.gm, constants[wq["constants"][k]].target) for k in ("weight", "weight_scale"))
    q = sd["model.layers.0.self_attn.q_proj.weight"]
    rows = q.shape[0]
    assert q.dtype == torch.float8_e4m3fn and sd["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float32
    assert torch.equal(q.view(torch.uint8), values[:rows].view(torch.uint8))
    assert torch.equal(sd["model.layers.0.self_attn.q_proj.weight_scale"], scale[:rows])
    assert rel_err(_logits(_hf(out)), engine(TEST_IDS).logits) < 1e-5  # measured 2.4e-7
    half = zq.export_compressed_tensors(engine, tmp_path / "half", dtype="float16")  # FP8 codes stay FP8
    sd = load_file(os.path.join(half, "model.safetensors"))
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert sd["lm_head.weight"].dtype == torch.float16
    assert json.load(open(os.path.join(half, "config.json")))["dtype"] == "float16"


def test_dtype_of_the_float_tensors(tmp_path, w8a8_folder):
    _, engine = _compile("w8a8")
    out = zq.export_compressed_tensors(engine, tmp_path / "bf16", dtype="bfloat16")
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    sd = load_file(os.path.join(out, "model.safetensors"))
    full = load_file(os.path.join(w8a8_folder, "model.safetensors"))
    assert sd.keys() == full.keys()
    for k, v in sd.items():
        want = (torch.float32 if k.endswith("_scale") else
                torch.bfloat16 if full[k].is_floating_point() else full[k].dtype)
        assert v.dtype == want and torch.equal(v, full[k].to(want)), k
    assert _logits(_hf(out)).dtype == torch.bfloat16
    with pytest.raises(zq.ExportError, match="dtype must be one of"):
        zq.export_compressed_tensors(engine, tmp_path / "x", dtype="int8")


def test_int4_groups_pack_quantized(tmp_path):
    """w4/8a16: INT8 channel and INT4 K-group layers, weight-only: pack-quantized, one config group per scheme
    naming its layers. transformers' dense (dequantize=True) path applies the first group's scheme to every
    layer (5.24), so the folder is loaded as it is: compressed-tensors decompresses each layer with its own."""
    model, engine = _compile("w4/8a16")
    out = zq.export_compressed_tensors(engine, tmp_path / "ct")
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["format"] == "pack-quantized"
    by_layer = {t: g for g in qc["config_groups"].values() for t in g["targets"]}
    down = by_layer["model.layers.0.mlp.down_proj"]["weights"]
    assert (down["num_bits"], down["strategy"], down["group_size"]) == (4, "group", 128)
    gate = by_layer["model.layers.0.mlp.gate_proj"]["weights"]
    assert (gate["num_bits"], gate["strategy"], gate["group_size"]) == (4, "group", 64)  # K = 64
    assert by_layer["model.layers.0.self_attn.q_proj"]["weights"]["strategy"] == "channel"
    sd = load_file(os.path.join(out, "model.safetensors"))
    assert sd["model.layers.0.mlp.down_proj.weight_packed"].dtype == torch.int32
    assert sd["model.layers.0.mlp.down_proj.weight_packed"].shape == (64, 128 * 4 // 32)
    assert sd["model.layers.0.mlp.down_proj.weight_scale"].shape == (64, 1)
    assert sd["model.layers.0.mlp.down_proj.weight_shape"].tolist() == [64, 128]
    ref = _w_a16_reference(model, {**{leaf: (8, "row_groups", None) for leaf in LINEARS[:4]},
                                   "mlp.gate_proj": (4, "k_groups", 64), "mlp.up_proj": (4, "k_groups", 64),
                                   "mlp.down_proj": (4, "k_groups", 128)})
    loaded = _logits(_hf(out))
    assert (loaded - _logits(ref)).abs().max() <= 1e-5 * _logits(ref).abs().max()
    assert (loaded - engine(TEST_IDS).logits).abs().max() <= 1e-4 * loaded.abs().max()  # the engine: W4/8A16 too


def test_feature_scales_are_exported_folded(tmp_path):
    model, engine = _compile("w8a8-fws")
    folded = [f["fqn"] for f in engine.record.fusions if f["kind"] == "feature-scales"]
    norms = [n for n in folded if n.endswith("layernorm")]
    assert norms, "no norm site was scaled: the test needs one"
    out = zq.export_compressed_tensors(engine, tmp_path / "ct")
    sd = load_file(os.path.join(out, "model.safetensors"))
    params = dict(model.named_parameters())
    by_name = {v: k for k, v in engine.record.parameters.items()}
    for norm in norms:
        name = f"{norm}.weight"
        node = next(n for n in engine.gm.graph.nodes if n.op == "get_attr" and constant_key(n.target) == by_name[name])
        assert torch.equal(sd[name], getattr(engine.gm, node.target))  # the folded weight, under the norm's name
        assert not torch.allclose(sd[name], params[name])
    hf = _logits(_hf(out))
    assert rel_err(hf, engine(TEST_IDS).logits) < 0.02
    assert rel_err(hf, _logits(model)) < 0.05


def test_roundtrip_import_runs_the_stored_weights(tmp_path, w8a8_folder):
    for config in ("w8a8", "w4/8a8"):
        _, engine = _compile(config)
        out = w8a8_folder if config == "w8a8" else zq.export_compressed_tensors(engine, tmp_path / "w4_8a8")
        imported = zq.import_compressed_tensors(out, generation=False)
        assert imported.record.config == "compressed-tensors"
        notes = next(p["notes"] for p in imported.record.passes if p["name"] == "group_wise_weight")
        assert notes == ["0 weights quantized", "8 weights as the checkpoint stored them"]
        assert [g["scheme"] for g in imported.record.gemms] == [g["scheme"] for g in engine.record.gemms]
        assert torch.equal(imported(TEST_IDS).logits, engine(TEST_IDS).logits)
        again = zq.export_compressed_tensors(imported, tmp_path / (config.replace("/", "_") + "_again"))
        a, b = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(again, "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ct_written_folder(tmp_path, preset: str, group_size: int | None = None) -> str:
    """A folder compressed-tensors itself writes (llm-compressor's save path), scales from max|W| per row or group
    by its own convention (127.5 / 7.5 steps: int8 values of -128 and int4 values of -8 appear)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    model = tiny_model("llama", seed=1)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    if group_size:
        scheme.weights.group_size = group_size
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for _, mod in model.named_modules():
        if hasattr(mod, "weight_scale"):
            w = mod.weight.detach()
            if group_size:
                mod.weight_scale.data.copy_(w.reshape(w.shape[0], -1, group_size).abs().amax(-1) / 7.5)
            else:
                mod.weight_scale.data.copy_(w.abs().amax(1, keepdim=True) / 127.5)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    folder = str(tmp_path / preset)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    return folder


def test_import_a_folder_compressed_tensors_wrote(tmp_path):
    folder = _ct_written_folder(tmp_path, "W8A8")
    sd = load_file(os.path.join(folder, "model.safetensors"))
    engine = zq.import_compressed_tensors(folder, generation=False)
    constants = {constant_key(n.target): n.target for n in engine.gm.graph.nodes if n.op == "get_attr"}
    for g in engine.record.gemms:
        if g["scheme_spec"]["weight"] is None:
            continue
        wq = getattr(engine.gm, constants[g["constants"]["weight"]])
        stored = torch.cat([sd[f"{fqn}.weight"] for fqn, _ in g["parts"]])
        assert torch.equal(wq, stored)  # bit for bit, -128 included
    assert any((sd[k] == -128).any() for k in sd if k.endswith(".weight") and sd[k].dtype == torch.int8)
    assert rel_err(engine(TEST_IDS).logits, _logits(_hf(folder, dequantize=True))) < 0.03  # + A8 per token

    folder = _ct_written_folder(tmp_path, "W4A16", group_size=32)  # pack-quantized INT4 groups, weight-only
    engine = zq.import_compressed_tensors(folder, generation=False)
    assert {g["scheme"] for g in engine.record.gemms} == {"W: INT4 K groups of 32 | A16", "FP (model dtype)"}
    hf = _logits(_hf(folder))
    assert (engine(TEST_IDS).logits - hf).abs().max() <= 1e-4 * hf.abs().max()


def _edit_config(folder: str, edit) -> None:
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    edit(config["quantization_config"])
    json.dump(config, open(path, "w"))


@pytest.mark.parametrize("edit, message", [
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(type="float"), "FP8 (float-quantized) weights"),
    (lambda qc: qc["config_groups"]["group_0"]["input_activations"].update(dynamic=False, strategy="tensor"),
     "static (stored input scales: zqcompile calibrates its own) int8 tensor input activations"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(symmetric=False), "asymmetric weights"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(strategy="block"), "weight strategy 'block'"),
    (lambda qc: qc.update(kv_cache_scheme={"num_bits": 8}), "a quantized KV cache"),
])
def test_import_says_what_it_cannot_take(tmp_path, w8a8_folder, edit, message):
    import shutil
    folder = shutil.copytree(w8a8_folder, tmp_path / "ct")
    _edit_config(folder, edit)
    with pytest.raises(zq.ModelLoadError, match="group_0|kv_cache") as err:
        zq.import_compressed_tensors(folder, generation=False)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_export_errors_before_anything_is_written(tmp_path):
    _, static = _compile("ptq-static")
    with pytest.raises(zq.ExportError, match=r"model\.layers\.0\..*static per-tensor.*'w8a8'"):
        zq.export_compressed_tensors(static, tmp_path / "a")
    gpt2 = zq.compile(tiny_model("gpt2"), (ids(2, 16),), "w8a8", generation=False)
    with pytest.raises(zq.ExportError, match=r"transformer\.h\.0\.attn\.c_attn to compressed-tensors: it is a "
                                             r"Conv1D, not a torch\.nn\.Linear"):
        zq.export_compressed_tensors(gpt2, tmp_path / "b")
    _, none = _compile("none")
    with pytest.raises(zq.ExportError, match="quantizes no GEMM"):
        zq.export_compressed_tensors(none, tmp_path / "c")
    _, mixed = _compile("w8a8-fp8act")
    with pytest.raises(zq.ExportError, match=r"o_proj to compressed-tensors: INT8 weights with FP8 activations "
                                             r"\(preset w8a8-fp8act\) are no scheme .*'fp8'"):
        zq.export_compressed_tensors(mixed, tmp_path / "d")
    assert sorted(os.listdir(tmp_path)) == []  # no folder, no temporary
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    _, engine = _compile("w8a8")
    with pytest.raises(zq.OutputPathError, match="not empty"):
        zq.export_compressed_tensors(engine, tmp_path / "full")
    assert os.listdir(tmp_path / "full") == ["mine.txt"]
    (tmp_path / "empty").mkdir()
    zq.export_compressed_tensors(engine, tmp_path / "empty")  # a new or empty folder is fine
    assert sorted(os.listdir(tmp_path)) == ["empty", "full"]


def test_tokenizer_files_come_along(tmp_path):
    from tests.test_tokenizer_inputs import _tokenizer
    import transformers as T
    tok = _tokenizer()
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    tok.save_pretrained(src)
    model = T.AutoModelForCausalLM.from_pretrained(src)
    engine = zq.compile(model, tok(["the cat sat"], return_tensors="pt", return_token_type_ids=False), "w8a8",
                        generation=False)
    assert engine.record.source == str(src)
    out = zq.export_compressed_tensors(engine, tmp_path / "ct")
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(os.listdir(out))
    assert T.AutoTokenizer.from_pretrained(out)("the cat sat")["input_ids"] == tok("the cat sat")["input_ids"]


def test_cli_compile_export_import(tmp_path):
    """The installed command: a model folder -> compressed-tensors folder -> engine running its stored weights ->
    compressed-tensors again (the same tensors), with the one-line refusals on the way."""
    from tests.subproc import run_cli
    src, ct_dir = tmp_path / "src", tmp_path / "ct"
    tiny_model("llama").save_pretrained(src)
    r = run_cli("compile", src, "--config", "ptq-static", "--format", "compressed-tensors", "--out", tmp_path / "x")
    assert r.returncode == 2 and "static per-tensor" in r.stderr and "'w8a8'" in r.stderr
    assert not (tmp_path / "x").exists()
    r = run_cli("compile", src, "--format", "compressed-tensors", "--out", ct_dir, "--no-generation", "--seq", "8")
    assert r.returncode == 0, r.stderr
    assert f"wrote {ct_dir}/" in r.stdout and {"config.json", "model.safetensors"} <= set(os.listdir(ct_dir))
    r = run_cli("compile", ct_dir, "--config", "w8a8")
    assert r.returncode == 2 and "drop --config w8a8" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("compile", ct_dir, "--out", tmp_path / "m.zq", "--no-generation", "--seq", "8")
    assert r.returncode == 0, r.stderr
    assert "8 weights as the checkpoint stored them" in r.stdout and "config compressed-tensors" in r.stdout
    r = run_cli("export", tmp_path / "m.zq", "--format", "compressed-tensors", "-o", ct_dir)
    assert r.returncode == 1 and "not empty" in r.stderr
    r = run_cli("export", tmp_path / "m.zq", "--format", "compressed-tensors", "-o", tmp_path / "ct2")
    assert r.returncode == 0, r.stderr
    a, b = load_file(ct_dir / "model.safetensors"), load_file(tmp_path / "ct2" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    r = run_cli("generate", ct_dir, "--prompt", "hi")  # a command that takes a float model says what to do
    assert r.returncode == 2 and "compressed-tensors checkpoint" in r.stderr and "zqcompile compile" in r.stderr


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from zqcompile.export import compressed_tensors as exporter
    _, engine = _compile("w8a8")

    def fail(*args):
        raise KeyboardInterrupt  # Ctrl-C after the weights and config are written, while the tokenizer is copied
    monkeypatch.setattr(exporter, "_side_files", fail)
    with pytest.raises(KeyboardInterrupt):
        zq.export_compressed_tensors(engine, tmp_path / "ct")
    assert os.listdir(tmp_path) == []
