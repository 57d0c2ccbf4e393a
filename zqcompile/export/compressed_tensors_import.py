"""Import a compressed-tensors Hugging Face folder (made by zqcompile's exporter, llm-compressor or anyone
else) to run on zqcompile's engine with the checkpoint's own integer weights and scales: nothing is quantized
again. The folder's `quantization_config` is checked first, in full, and whatever the engine cannot run (FP8
or asymmetric weights, static or float activation scales, block strategies, transforms, a quantized KV cache)
is one ModelLoadError line naming the config group and field, before any weight is read.

What is taken: symmetric INT8 / INT4 weights with channel, group or tensor scales, stored int-quantized,
naive-quantized or pack-quantized, with dynamic per-token INT8 input activations or float ones. The model is
built from config.json with every quantized layer's float weight set to its dequantized value (capture and the
float paths need one) and the stored values and scales handed to the compile (PassContext.stored_weights);
the checkpoint's targets and ignore list become the QuantConfig's overrides, in the format's order (ignore
first), and the plan they give is checked against the tensors the folder holds.
"""
from __future__ import annotations

import os
import re
from dataclasses import replace

import torch
from torch import nn

from zqcompile.checkpoint import SafetensorsFolder
from zqcompile.config import FP, ActQuant, GemmScheme, QuantConfig, WeightQuant, classify_role, resolve_scheme
from zqcompile.errors import ModelLoadError
from zqcompile.export import ct_format as ctf
from zqcompile.export.ct_layout import checkpoint_name, expert_linears, stacked_parameters
from zqcompile.models import is_compressed_tensors, quantization_config
from zqcompile.ops import quant_math as qm
from zqcompile.passes.base import StoredWeight

_FORMATS = (ctf.INT_QUANTIZED, ctf.NAIVE_QUANTIZED, ctf.PACK_QUANTIZED)
_STRATEGIES = {"channel": "row_groups", "group": "k_groups", "tensor": "tensor"}


def _fail(path: str, what: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: {what}; zqcompile runs symmetric INT8 / INT4 integer weights (channel, group or "
                          f"tensor scales; int-, naive- or pack-quantized) with dynamic per-token INT8 or float "
                          f"input activations")


def _scheme(path: str, name: str, group: dict, top_format: str) -> GemmScheme:
    """The GemmScheme of one config group, or ModelLoadError naming what of it the engine cannot run."""
    where = f"compressed-tensors config group {name!r}"
    w, a = group.get("weights"), group.get("input_activations")
    fmt = group.get("format") or top_format
    if group.get("output_activations"):
        raise _fail(path, f"{where} quantizes output activations")
    if not w:
        raise _fail(path, f"{where} quantizes no weights")
    if w.get("type") == "float":
        raise _fail(path, f"{where} has FP{w.get('num_bits')} (float-quantized) weights, which this engine has no "
                          f"GEMM for")
    if w.get("type") != "int" or w.get("num_bits") not in (4, 8):
        raise _fail(path, f"{where} has {w.get('type')} {w.get('num_bits')}-bit weights")
    if not w.get("symmetric", True):
        raise _fail(path, f"{where} has asymmetric weights (zero points)")
    if w.get("strategy") not in _STRATEGIES:
        raise _fail(path, f"{where} has weight strategy {w.get('strategy')!r}")
    if w.get("actorder") not in (None, "weight", "static"):
        raise _fail(path, f"{where} has activation-ordered weight groups (actorder {w.get('actorder')!r}, g_idx)")
    if fmt not in _FORMATS:
        raise _fail(path, f"{where} is stored as {fmt!r}")
    if a is None:
        act = ActQuant("none")
    elif a.get("type") == "int" and a.get("num_bits") == 8 and a.get("strategy") == "token" and a.get("dynamic") \
            and a.get("symmetric", True):
        act = ActQuant("token")
    else:
        why = "dynamic" if a.get("dynamic") else "static (stored input scales: zqcompile calibrates its own)"
        raise _fail(path, f"{where} has {why} {a.get('type')}{a.get('num_bits')} {a.get('strategy')} input "
                          f"activations")
    gran = _STRATEGIES[w["strategy"]]
    size = w.get("group_size") if gran == "k_groups" else None
    if gran == "k_groups" and not size:
        raise _fail(path, f"{where} has weight strategy 'group' without a group_size")
    try:
        return GemmScheme(WeightQuant(w["num_bits"], gran, group_size=size), act)
    except ValueError as e:
        raise _fail(path, f"{where}: {e}") from None


def check_config(path: str, qc: dict) -> dict[str, GemmScheme]:
    """{group name: GemmScheme}, after checking everything the folder's config asks for (no weights read)."""
    for key, what in (("kv_cache_scheme", "a quantized KV cache"), ("transform_config", "weight transforms "
                      "(rotations)"), ("sparsity_config", "sparse weights")):
        if qc.get(key):
            raise _fail(path, f"the checkpoint has {what} ({key})")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise _fail(path, "its quantization_config has no config_groups")
    return {name: _scheme(path, name, g, qc.get("format")) for name, g in groups.items()}


def _override_key(target: str) -> str | type:
    """A compressed-tensors target or ignore entry as a QuantConfig override key (the same matching: 're:' is
    re.match, a plain name is the module's exact name, 'Linear' any torch.nn.Linear)."""
    if target == "Linear":
        return nn.Linear
    if target.startswith("re:"):
        return f"^(?:{target[3:]})"
    return f"^{re.escape(target)}$"


def _matches(target: str, name: str, module: nn.Module) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or any(c.__name__ == target for c in type(module).__mro__)


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the folder, on the CPU, each the engine's own (not a view of the mapped file)."""
    folder = SafetensorsFolder(path)
    return {name: folder.load(name, torch.device("cpu")) for name in folder.files}


def _stored(path: str, fqn: str, scheme: GemmScheme, tensors: dict) -> StoredWeight:
    w = scheme.weight
    scale = tensors.pop(f"{fqn}.weight_scale").float()
    if f"{fqn}.weight_zero_point" in tensors or f"{fqn}.weight_g_idx" in tensors:
        raise _fail(path, f"{fqn} stores zero points or a g_idx")
    if f"{fqn}.weight_packed" in tensors:
        shape = tuple(int(v) for v in tensors.pop(f"{fqn}.weight_shape").tolist())
        values = ctf.unpack_int32(tensors.pop(f"{fqn}.weight_packed"), w.bits, shape)
    elif f"{fqn}.weight" in tensors and tensors[f"{fqn}.weight"].dtype == torch.int8:
        values = tensors.pop(f"{fqn}.weight")
    else:
        raise _fail(path, f"{fqn} is quantized by the config but its weight is not stored as int8 values or packed "
                          f"int32 words")
    n, k = values.shape
    if w.granularity == "tensor":
        scale = scale.reshape(1, 1).expand(n, 1).contiguous()
    scale = scale.reshape(n, -1)
    groups = 1 if w.granularity != "k_groups" else k // w.group_size
    if scale.shape != (n, groups) or (w.granularity == "k_groups" and k % w.group_size):
        raise _fail(path, f"{fqn}: weight_scale {tuple(scale.shape)} does not fit a [{n}, {k}] weight with "
                          f"{w.describe()}")
    return StoredWeight(values.contiguous(), scale.contiguous(), w.bits)


def _config(qc: dict, schemes: dict[str, GemmScheme], layers: dict[str, nn.Module]) -> QuantConfig:
    """The QuantConfig of the checkpoint's ignore list and config groups (targets as overrides, in order)."""
    ignore = [t for t in (qc.get("ignore") or []) if any(_matches(t, n, m) for n, m in layers.items())]
    overrides: list = [(_override_key(t), FP) for t in ignore]
    for name, group in qc["config_groups"].items():
        overrides += [(_override_key(t), schemes[name]) for t in group.get("targets", [])
                      if any(_matches(t, n, m) for n, m in layers.items())]
    return QuantConfig("compressed-tensors", FP, {}, tuple(overrides), merge_gemms=True)


def _all_two_level(scheme: GemmScheme, stored: list[StoredWeight]) -> bool:
    """Whether an INT4 K-group scheme's stored weights all have two-level scales (qm.is_two_level)."""
    w = scheme.weight
    if w is None or w.bits != 4 or w.granularity != "k_groups":
        return False
    return bool(stored) and all(qm.is_two_level(s.scale) for s in stored)


def load_compressed_tensors(path: str) -> tuple[nn.Module, QuantConfig, dict[str, StoredWeight]]:
    """(the float model with dequantized weights, the QuantConfig the checkpoint's config amounts to, the stored
    quantized weights by module FQN) of a compressed-tensors folder; ModelLoadError for what cannot be taken."""
    import transformers as T
    from zqcompile.models import read_config
    path = os.path.abspath(path)
    qc = quantization_config(path) or {}
    schemes = check_config(path, qc)
    config = read_config(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the model is built float; the engine's plan says what is quantized
    cls = next((getattr(T, a) for a in config.architectures or [] if isinstance(getattr(T, a, None), type)), None)
    model = (cls(config) if cls is not None else T.AutoModelForCausalLM.from_config(config)).eval()
    tensors = _model_names(model, _read_tensors(path))
    modules = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    experts = expert_linears(model)  # checkpoint Linear layers that are rows of the model's stacked experts
    layers = {**modules, **{x.name: nn.Linear(1, 1, device="meta") for x in experts}}
    cfg = _config(qc, schemes, layers)
    stored, state, scheme_of = {}, {}, {}
    for fqn, mod in layers.items():
        scheme, _ = resolve_scheme(cfg, fqn, classify_role(fqn), [type(mod)])
        has = f"{fqn}.weight_scale" in tensors
        if scheme.is_float and has:
            raise _fail(path, f"{fqn} stores a weight_scale but no config group quantizes it")
        if not scheme.is_float:
            if not has:
                raise _fail(path, f"{fqn} is quantized by the config but stores no weight_scale")
            stored[fqn] = s = _stored(path, fqn, scheme, tensors)
            scheme_of[fqn] = scheme
            gk = s.values.shape[1] // s.scale.shape[1]
            state[f"{fqn}.weight"] = (s.values.float() * s.scale.repeat_interleave(gk, dim=1)).to(mod.weight.dtype)
    two_level = {name: replace(sch, weight=replace(sch.weight, group_scales="two-level"))
                 for name, sch in schemes.items()
                 if _all_two_level(sch, [s for fqn, s in stored.items() if scheme_of[fqn] is sch])}
    if two_level:  # INT4 groups whose stored scales are all two-level: the engine may run them as INT8 GEMMs
        cfg = _config(qc, {**schemes, **two_level}, layers)
    if experts:
        cfg, stored = _stack_experts(model, experts, cfg, stored, state, tensors)
    state.update(tensors)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise ModelLoadError(f"{path}: the weights do not fit {type(model).__name__}: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model, cfg, stored


def _model_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the model's own names where transformers renames them on load (Mixtral's
    `block_sparse_moe.` -> `mlp.`); a quantized layer's companions (weight_scale, ...) follow their weight."""
    renamed, stacked = {}, stacked_parameters(model)  # those: the per-expert layers (_stack_experts)
    for name in model.state_dict():
        if name in stacked:
            continue
        saved = checkpoint_name(model, name)
        if saved != name:
            renamed[saved.rsplit(".", 1)[0]] = name.rsplit(".", 1)[0]
    out = {}
    for key, t in tensors.items():
        prefix, _, leaf = key.rpartition(".")
        out[f"{renamed[prefix]}.{leaf}" if prefix in renamed else key] = t
    return out


def _stack_experts(model: nn.Module, experts: list, cfg: QuantConfig, stored: dict, state: dict,
                   tensors: dict) -> tuple[QuantConfig, dict]:
    """The per-expert checkpoint layers back into the model's stacked experts: their float weights into the
    stacked parameter's rows, their stored values and scales as the engine GEMM part's (the part's rows in
    order), and each part's scheme as an override of the part."""
    by_part: dict[str, list] = {}
    for x in experts:
        by_part.setdefault(x.part, []).append(x)
        w = state.pop(f"{x.name}.weight", None)
        w = tensors.pop(f"{x.name}.weight") if w is None else w
        module, e, leaf = x.part.rsplit(".", 2)
        state.setdefault(f"{module}.{leaf}", model.get_parameter(f"{module}.{leaf}").detach().clone())
        state[f"{module}.{leaf}"][int(e), x.r0:x.r1] = w
    parts, overrides = {}, []
    for part, xs in by_part.items():
        xs = sorted(xs, key=lambda x: x.r0)
        mine = [stored.pop(x.name, None) for x in xs]
        scheme, _ = resolve_scheme(cfg, xs[0].name, classify_role(xs[0].name), [nn.Linear])
        if any(resolve_scheme(cfg, x.name, classify_role(x.name), [nn.Linear])[0] != scheme for x in xs):
            raise ModelLoadError(f"the checkpoint's layers {[x.name for x in xs]} are one GEMM of the model's "
                                 f"experts ({part}) and must have one scheme")
        overrides.append((f"^{re.escape(part)}$", scheme))
        if mine[0] is not None:
            parts[part] = StoredWeight(torch.cat([s.values for s in mine]), torch.cat([s.scale for s in mine]),
                                       mine[0].bits)
    return replace(cfg, overrides=tuple(overrides) + cfg.overrides), {**stored, **parts}


def import_compressed_tensors(path: str | os.PathLike, example_inputs=None, generation=None,
                              dump_dir: str | os.PathLike | None = None):
    """Compile a compressed-tensors folder into an engine that runs the checkpoint's own integer weights and
    scales (see zqcompile.compile for example_inputs, generation and dump_dir; example_inputs default to random
    token ids [2, 16])."""
    from zqcompile.api import _compile_checked
    path = os.fspath(path)
    if not is_compressed_tensors(path):
        raise ModelLoadError(f"{path!r} is not a compressed-tensors folder (its config.json has no "
                             f"quantization_config with quant_method 'compressed-tensors')")
    model, cfg, stored = load_compressed_tensors(path)
    if example_inputs is None:
        vocab = getattr(model.config, "vocab_size", 1000)
        example_inputs = (torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)),)
    return _compile_checked(model, example_inputs, cfg, dump_dir=dump_dir, lkd=None, calibration_data=None,
                            example_kwargs=None, generation=generation, stored_weights=stored,
                            source=os.path.abspath(path))


__all__ = ["import_compressed_tensors", "is_compressed_tensors", "load_compressed_tensors"]
