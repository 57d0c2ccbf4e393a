"""Export a compiled engine as a compressed-tensors Hugging Face folder (what transformers' and vLLM's
compressed-tensors loaders read): config.json with a `quantization_config`, model.safetensors with every
quantized layer's integer weight and fp32 scales under the format's names (export/ct_format.py), the float
tensors under the model's own parameter names, and the tokenizer files of the folder the model came from.

The engine's quantized weights are written as they are (nothing is quantized again): a fused GEMM (q/k/v,
gate/up) is split back into the model's own layers by the rows the compile record gives each module
(record.gemms[i]["parts"]), stacked MoE experts become the per-expert Linear layers transformers saves them as
(export/ct_layout.py), every tensor goes under the name transformers saves it under, and norms are written as
the model's parameters hold them (feature-scale-folded norms folded, Gemma's 1 + w norms as w), so the
checkpoint computes what the engine's weights compute. Everything is checked before anything is written; the folder is written next to
the target and renamed into place at the end (zqcompile.files.atomic_dir).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass

import torch
from torch import nn

from zqcompile.capture import get_tensor
from zqcompile.errors import ExportError
from zqcompile.export import ct_format as ctf
from zqcompile.export.ct_layout import checkpoint_name, expert_linears, stacked_parameters
from zqcompile.files import atomic_dir, check_output_dir
from zqcompile.ops import quant_math as qm
from zqcompile.runtime.enginefile import constant_key

WHAT = "compressed-tensors folder"


@dataclass
class _Layer:
    """One of the model's Linear layers as the engine runs it: rows [r0, r1) of a GEMM of the record."""

    fqn: str
    gemm: dict
    r0: int
    r1: int
    group: int | None  # its config group, None: floating point (listed in `ignore`)


def _static_error(where: str) -> ExportError:
    return ExportError(f"cannot export {where} to compressed-tensors: its input activations use static per-tensor "
                       f"INT8 scales calibrated by zqcompile (preset ptq-static), which this exporter does not write; "
                       f"compile with config 'w8a8' (dynamic per-token activations) instead")


def _nothing_quantized(config: str) -> ExportError:
    return ExportError(f"cannot export to compressed-tensors: config {config!r} quantizes no GEMM; save the float "
                       f"model with save_pretrained instead, or choose a quantizing config such as 'w8a8'")


def check_exportable(cfg) -> None:
    """What a QuantConfig alone says the export cannot take, before a model is loaded (the CLI's early check)."""
    from zqcompile.config import as_scheme
    schemes = [cfg.default, *cfg.roles.values(), *(as_scheme(v) for _, v in cfg.overrides)]
    if cfg.uses_static_activations:
        raise _static_error(f"the GEMMs of config {cfg.name!r}")
    for s in schemes:
        if not s.is_float:
            _scheme({"fqn": f"the GEMMs of config {cfg.name!r}", "scheme_spec": asdict(s)})
    if all(s.is_float for s in schemes):
        raise _nothing_quantized(cfg.name)
    if cfg.attention is not None:
        raise ExportError(f"cannot export config {cfg.name!r} to compressed-tensors: its quantized attention "
                          f"(QuantConfig.attention) has no place in a Hugging Face model; compile without it")


def _scheme(gemm: dict) -> tuple[dict, dict | None] | None:
    """(weights, input_activations) QuantizationArgs of a GEMM's scheme; None for a floating-point GEMM."""
    spec = gemm["scheme_spec"]
    w, act = spec["weight"], spec["act"]["mode"]
    if w is None:
        return None
    if act == "tensor":
        raise _static_error(gemm["fqn"])
    fp8_w, fp8_a = w.get("dtype") == "fp8", spec["act"].get("dtype") == "fp8"
    if fp8_a and not fp8_w:
        raise ExportError(f"cannot export {gemm['fqn']} to compressed-tensors: INT8 weights with FP8 activations "
                          f"(preset w8a8-fp8act) are no scheme the format's loaders run; compile with 'fp8' (FP8 "
                          f"weights and activations, float-quantized) or 'w8a8' (int-quantized)")
    if fp8_w:
        return ctf.FP8_WEIGHTS, ctf.FP8_TOKEN_INPUT
    # Row groups and per-tensor scales are stored expanded to one scale per output row ([N, 1]), which is
    # exactly the format's channel strategy: each row carries its group's scale.
    strategy, group = ("group", w["group_size"]) if w["granularity"] == "k_groups" else ("channel", None)
    return ctf.int_args(w["bits"], strategy, group), (ctf.TOKEN_INPUT if act == "token" else None)


def _skeleton(record) -> nn.Module:
    """The model rebuilt from its config on the meta device (no memory): its layers, parameter names and ties."""
    import transformers as T
    hf = record.hf_config
    arch = (hf.get("architectures") or [record.model])[0]
    cls = getattr(T, arch, None)
    if cls is None or hf.get("model_type") not in T.CONFIG_MAPPING:
        raise ExportError(f"cannot export to compressed-tensors: the engine was compiled from {arch} "
                          f"(model_type {hf.get('model_type')!r}), which transformers {T.__version__} does not know")
    config = T.CONFIG_MAPPING[hf["model_type"]].from_dict(hf)
    with torch.device("meta"):
        return cls(config)


def _plan(record, model: nn.Module) -> tuple[list[_Layer], list[dict]]:
    """Every GEMM part as a layer of the checkpoint (a stacked expert's projection as the per-expert Linear
    layers transformers saves it as, export/ct_layout.py), and the config groups (one per distinct scheme);
    every scheme and layer the format or this exporter cannot take raises ExportError here, before anything
    is written."""
    modules = dict(model.named_modules())
    experts: dict[str, list] = {}
    for x in expert_linears(model):
        experts.setdefault(x.part, []).append(x)
    layers, groups, keys = [], [], {}
    for g in record.gemms:
        if not {"parts", "constants", "scheme_spec"} <= set(g):
            raise ExportError(f"cannot export {g['fqn']} to compressed-tensors: the engine was compiled by an older "
                              f"zqcompile that did not record its layers; compile the model again")
    if not any(g["scheme_spec"]["weight"] for g in record.gemms):
        raise _nothing_quantized(record.config)
    for g in record.gemms:
        args = _scheme(g)
        group = None
        if args is not None:
            key = json.dumps(args, sort_keys=True)
            if key not in keys:
                keys[key] = len(groups)
                groups.append({"weights": args[0], "input_activations": args[1], "layers": []})
            group = keys[key]
        r0 = 0
        for fqn, rows in g["parts"]:
            mod = modules.get(fqn)
            if fqn in experts:
                parts = [(x.name, r0 + x.r0, r0 + x.r1) for x in experts[fqn]]
            elif mod is None:
                raise ExportError(f"cannot export {fqn} to compressed-tensors: {type(model).__name__} built from the "
                                  f"engine's config has no such module")
            elif args is not None and not isinstance(mod, nn.Linear):
                raise ExportError(f"cannot export {fqn} to compressed-tensors: it is a {type(mod).__name__}, not a "
                                  f"torch.nn.Linear, and the format quantizes Linear layers only; keep it in floating "
                                  f"point (config.with_overrides({{{fqn!r}: 'fp'}})) or export to ONNX")
            else:
                parts = [(fqn, r0, r0 + rows)]
            for name, a, b in parts:
                layers.append(_Layer(name, g, a, b, group))
                if group is not None:
                    groups[group]["layers"].append(name)
            r0 += rows
    return layers, groups


def _quantization_config(model: nn.Module, layers: list[_Layer], groups: list[dict]) -> dict:
    quantized, modules = {x.fqn for x in layers if x.group is not None}, dict(model.named_modules())
    ignore = sorted({n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in quantized} |
                    {x.fqn for x in layers if x.group is None and x.fqn not in modules})  # + float per-expert layers
    config_groups = {}
    for i, g in enumerate(groups):
        config_groups[f"group_{i}"] = {
            # one scheme: every Linear not ignored; several: each group names its layers
            "targets": ["Linear"] if len(groups) == 1 else sorted(g["layers"]),
            "weights": g["weights"], "input_activations": g["input_activations"], "output_activations": None,
            "format": ctf.storage_format(g["input_activations"])}
    formats = {g["format"] for g in config_groups.values()}
    return {"quant_method": ctf.QUANT_METHOD, "format": formats.pop() if len(formats) == 1 else ctf.MIXED,
            "config_groups": config_groups, "ignore": ignore, "quantization_status": "compressed",
            "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}}


def _layer_tensors(layer: _Layer, groups: list[dict], constants: dict, expected: dict) -> dict[str, torch.Tensor]:
    c, g, rows = layer.gemm["constants"], layer.gemm, slice(layer.r0, layer.r1)
    out = {}
    weight = constants[c["weight"]]
    if layer.group is None:
        out[f"{layer.fqn}.weight"] = weight[rows]
    else:
        bits = g["scheme_spec"]["weight"]["bits"]
        values, scale = qm.weight_int8(weight, bits)[rows], constants[c["weight_scale"]][rows].float()
        if ctf.storage_format(groups[layer.group]["input_activations"]) in (ctf.INT_QUANTIZED, ctf.FLOAT_QUANTIZED):
            out[f"{layer.fqn}.weight"] = values
        else:
            out[f"{layer.fqn}.weight_packed"] = ctf.pack_int32(values, bits)
            out[f"{layer.fqn}.weight_shape"] = torch.tensor(list(values.shape), dtype=torch.int64)
        out[f"{layer.fqn}.weight_scale"] = scale
    if c.get("bias"):
        out[f"{layer.fqn}.bias"] = constants[c["bias"]][rows]
    for name in (f"{layer.fqn}.weight", f"{layer.fqn}.bias"):  # e.g. a transposed weight of another layer type
        if name in out and name in expected and tuple(out[name].shape) != tuple(expected[name].shape):
            raise ExportError(f"cannot export {layer.fqn}: the engine holds a {tuple(out[name].shape)} tensor for "
                              f"{name}, the model's parameter is {tuple(expected[name].shape)}")
    return out


def _state_dict(engine, model: nn.Module, layers: list[_Layer], groups: list[dict]) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, by the name transformers saves it under; a parameter tied to another is
    written once, under the first name (the embedding; transformers ties the head to it at load)."""
    gm = engine.gm
    constants = {constant_key(n.target): get_tensor(gm, n) for n in gm.graph.nodes if n.op == "get_attr"}
    offsets = engine.record.parameter_offsets
    if not offsets and any("_plus_one" in k for k in engine.record.parameters):  # fold_decomposed's constant name
        raise ExportError("cannot export to compressed-tensors: the engine was compiled by an older zqcompile that "
                          "did not record that its (1 + weight) norms (Gemma) hold 1 + weight; compile the model again")
    by_param = {name: constants[k] - offsets[k] if k in offsets else constants[k]
                for k, name in engine.record.parameters.items() if k in constants}
    stacked = stacked_parameters(model)
    expected = {k: v for k, v in model.state_dict().items() if k not in stacked}  # those: per-expert layers
    out: dict[str, torch.Tensor] = {}
    for layer in layers:
        out.update(_layer_tensors(layer, groups, constants, expected))
    ties: dict[int, list[str]] = {}
    for name, p in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        ties.setdefault(id(p), []).append(name)
    for names in ties.values():
        names = [n for n in names if n in expected]
        if len(names) < 2:
            continue
        have = [n for n in names if n in out or n in by_param]
        if any(n in out and out[n].dtype in (torch.int8, torch.int32, qm.FP8_DTYPE) for n in have) or \
                any(f"{n.rsplit('.', 1)[0]}.weight_packed" in out for n in names):
            raise ExportError(f"cannot export {names}: these parameters are one tied tensor and the engine quantized "
                              f"it for one of them; keep that layer in floating point")
        if have:
            value = out.pop(have[0]) if have[0] in out else by_param[have[0]]
            for n in names[1:]:
                out.pop(n, None)
            out[names[0]] = value
        for n in names[1:]:
            expected.pop(n)
    for name in expected:
        if name in out or f"{name}_packed" in out:
            continue
        if name not in by_param:
            raise ExportError(f"cannot export to compressed-tensors: the engine holds no tensor for the model's "
                              f"parameter {name!r}")
        out[name] = by_param[name]
    per_expert = {x.fqn for x in layers} - dict(model.named_modules()).keys()  # already the checkpoint's names
    return {(k if k.rsplit(".", 1)[0] in per_expert else checkpoint_name(model, k)): v.detach().cpu().contiguous()
            for k, v in out.items()}


def _side_files(source: str, tokenizer, folder: str) -> list[str]:
    """The tokenizer (and generation defaults) next to the weights: `tokenizer` saved, or the source folder's
    files copied, or a .gguf source's vocabulary saved as a tokenizer."""
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    elif source and os.path.isdir(source):
        for name in ctf.SIDE_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copy2(os.path.join(source, name), os.path.join(folder, name))
    elif source.endswith(".gguf") and os.path.isfile(source):
        from zqcompile.models import load_tokenizer
        load_tokenizer(source).save_pretrained(folder)
    return sorted(n for n in os.listdir(folder) if n not in ("config.json", "model.safetensors"))


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _float(name: str, t: torch.Tensor) -> bool:
    """A float tensor of the model (not a scale, not FP8 codes): what --dtype converts and config.json names."""
    return t.is_floating_point() and t.dtype != qm.FP8_DTYPE and not name.endswith("_scale")


def export_compressed_tensors(engine, out_dir: str | os.PathLike, tokenizer=None, dtype: str | None = None) -> str:
    """Write `engine` as a compressed-tensors Hugging Face folder at `out_dir` (new or empty; written atomically);
    returns its path. `tokenizer`: saved into the folder; by default the tokenizer files of the folder (or .gguf)
    the model was loaded from are copied, when the engine knows it. `dtype` ("float16", "bfloat16", "float32"):
    the float tensors' dtype and the config's (default: as the engine holds them; the weight scales stay fp32).
    Raises ExportError naming the layer and what to choose instead for what the format or this exporter cannot
    take, before anything is written."""
    from safetensors.torch import save_file
    record = engine.record
    check_output_dir(out_dir, WHAT)
    if dtype is not None and dtype not in _DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if not record.hf_config:
        raise ExportError(f"cannot export to compressed-tensors: the engine records no Hugging Face config (it was "
                          f"compiled from a {record.model} without one, or by an older zqcompile: compile it again); "
                          f"compressed-tensors folders are Hugging Face models")
    copies = [f["fqn"] for f in record.fusions if f["kind"] == "feature-scales:norm-copy"]
    if copies:
        raise ExportError(f"cannot export to compressed-tensors: the GEMMs after {copies[0]} read a feature-scaled "
                          f"copy of that norm, which a Hugging Face model has no place for; compile with "
                          f"FeatureScales(norm_copies=False)")
    quant_attn = [f["fqn"] for f in record.fusions if f["kind"] == "quant-attention"]
    if quant_attn:
        raise ExportError(f"cannot export to compressed-tensors: {quant_attn[0]} runs HERO's quantized attention "
                          f"(QuantConfig.attention), which a Hugging Face model does not; compile without it")
    model = _skeleton(record)
    layers, groups = _plan(record, model)
    tensors = _state_dict(engine, model, layers, groups)
    if dtype is not None:
        tensors = {k: v.to(_DTYPES[dtype]) if _float(k, v) else v for k, v in tensors.items()}
    floats = [t.dtype for k, t in tensors.items() if _float(k, t)]
    config = dict(record.hf_config, dtype=str(max(set(floats), key=floats.count)).removeprefix("torch."),
                  quantization_config=_quantization_config(model, layers, groups))
    with atomic_dir(out_dir, WHAT) as tmp:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        _side_files(record.source, tokenizer, tmp)
    return os.path.abspath(os.fspath(out_dir))


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


__all__ = ["check_exportable", "export_compressed_tensors", "folder_bytes"]
