"""Public entry points: compile, compile_folder, dump, load. compile = validate -> (LKD) -> capture -> pass
pipeline -> Engine; compile_folder does the same on a safetensors folder's skeleton, then streams its weights."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, replace
from typing import Callable

import torch
from torch import fx, nn

from zqcompile.capture import InputError, capture
from zqcompile.config import AccuracyBudget, FeatureScales, LKDConfig, QuantConfig, get_config
from zqcompile.generation.generator import is_causal_lm
from zqcompile.generation.kv_cache import CacheSpec
from zqcompile.memory import peak_memory
from zqcompile.parallel.group import TensorParallel
from zqcompile.runtime.engine import CompileRecord, Engine, load
from zqcompile.runtime.outputs import flatten_graph_outputs
from zqcompile import progress
from zqcompile.passes import PIPELINE, PassContext, run_pipeline
from zqcompile.passes.constants import SharedConstants


def compile(model: nn.Module, example_inputs: tuple | Mapping, config: QuantConfig | str = "w8a8",
            dump_dir: str | os.PathLike | None = None, lkd: LKDConfig | None = None,
            calibration_data: list[tuple | Mapping] | None = None, example_kwargs: dict | None = None,
            generation: CacheSpec | bool | None = None, accuracy_budget: float | None = None,
            tp: TensorParallel | None = None) -> Engine:
    """Quantize and fuse `model` into a ZeroQuant engine.

    example_inputs: positional inputs of model.forward (e.g. `(input_ids,)`), or a tokenizer's output (a
    BatchEncoding / dict of `input_ids`, `attention_mask`, `token_type_ids`: the engine then takes the same dict,
    `engine(batch)` or `engine(**batch)`), used to capture the graph with dynamic batch and sequence length.
    config: a preset name (see zqcompile.PRESETS) or a QuantConfig.
    calibration_data: input tuples or dicts for static ("ptq-static") activation ranges and feature scales.
    lkd: run layer-by-layer knowledge distillation on the weights first (ZeroQuant Sec. 4.2).
    generation (causal LMs): the KV cache the prefill/decode graphs of `engine.generate` are built for, here,
    sharing the engine's quantized weights: a CacheSpec, None for CacheSpec() (batches up to 8, 512 tokens),
    False for none. The engine keeps no reference to `model`.
    accuracy_budget (with calibration_data): HERO's feature-wise scales first (when the config has none), then
    the fewest GEMMs in FP16 (HERO's mode switch) for which the calibration data stays within this budget of the
    float model: for a causal LM the expected perplexity increase, exp(mean next-token KL) - 1 (0.01 = +1%); for
    an encoder 1 - the least sentence-embedding cosine (0.01 = min cosine 0.99). zqcompile.AccuracyBudget in
    QuantConfig.accuracy_budget sets the metric, the tokens used and whether feature scales come first.
    tp: tensor parallelism over torch.distributed (zqcompile.TensorParallel): this process compiles its rank's
    shard (1/size of the heads, KV cache and MLP; an all-reduce after o_proj and down_proj); run one process
    per rank (torchrun), each with the same arguments. Every rank's engine returns the full outputs.
    """
    cfg = get_config(config)
    if isinstance(model, (str, os.PathLike)):
        raise InputError(f"model must be a torch.nn.Module, got the path {os.fspath(model)!r}: to compile a "
                         f"safetensors folder block by block without loading it, call zq.compile_folder(path, ...)")
    if accuracy_budget is not None:
        cfg = replace(cfg, accuracy_budget=AccuracyBudget(budget=accuracy_budget))
    if cfg.accuracy_budget is not None:
        cfg = _budget_config(cfg, model, calibration_data)
    return _compile_checked(model, example_inputs, cfg, dump_dir, lkd, calibration_data, example_kwargs, generation,
                            tp=tp)


def _budget_config(cfg: QuantConfig, model: nn.Module, calibration_data) -> QuantConfig:
    """The accuracy budget's metric resolved for this model (KL for a causal LM, embedding cosine otherwise) and
    HERO's feature-wise scales added first when the config has none and the budget asks for them."""
    ab = cfg.accuracy_budget
    if not calibration_data:
        raise InputError("accuracy_budget needs calibration_data: batches of inputs like what you serve, "
                         "e.g. calibration_data=[(ids[:, :512],)]")
    causal = is_causal_lm(model)
    if ab.metric == "kl" and not causal:
        raise InputError(f"accuracy_budget metric 'kl' scores next-token distributions and needs a causal LM; "
                         f"for {type(model).__name__} use metric='cosine' (or 'auto')")
    if ab.metric == "auto":
        ab = replace(ab, metric="kl" if causal else "cosine")
    cfg = replace(cfg, accuracy_budget=ab)
    if ab.feature_scales and cfg.feature_scales is None:
        cfg = replace(cfg, feature_scales=FeatureScales())
    return cfg


def _compile_checked(model, example_inputs, cfg: QuantConfig, dump_dir, lkd, calibration_data, example_kwargs,
                     generation, stored_weights: dict | None = None, source: str | None = None,
                     tp: TensorParallel | None = None) -> Engine:
    """compile() after its config is resolved; the compressed-tensors import comes in here with the checkpoint's
    quantized weights (`stored_weights`, PassContext.stored_weights) and the folder it read (`source`)."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    example_inputs, example_kwargs = _check_inputs(example_inputs, example_kwargs, generation, dump_dir)
    if tp is not None and not isinstance(tp, TensorParallel):
        raise InputError(f"tp must be a zqcompile.TensorParallel or None, got {type(tp).__name__}")
    tp = tp if tp is not None and tp.size > 1 else None
    if tp is not None:
        _check_tensor_parallel(model, cfg, tp)
    model = model.eval()
    if lkd is not None:
        from zqcompile.accuracy.lkd import run_lkd
        model = run_lkd(model, cfg, lkd)
    shards, rank = {}, None
    if tp is not None:  # after LKD, which distills the whole model
        model, shards, rank, example_inputs, example_kwargs, calibration_data = _shard(
            model, cfg, tp, example_inputs, example_kwargs, calibration_data)
    with peak_memory() as peak:
        engine = _compile(model, cfg, example_inputs, example_kwargs, calibration_data, generation, shards,
                          stored_weights or {})
    engine.record.source = source if source is not None else _model_source(model)
    if rank is not None:
        from zqcompile.parallel import agree
        engine.record.tensor_parallel = rank.describe()
        agree(rank, "the compiled plan", [(g["fqn"], g["scheme"], g["shape"]) for g in engine.record.gemms])
    engine.record.memory = {**peak, "engine_bytes": engine.memory_bytes()}
    if cfg.accuracy_budget is not None:
        _measure_budget(engine, model, cfg, calibration_data)
    if dump_dir is not None:
        dump(engine, dump_dir)
    return engine


def _check_tensor_parallel(model: nn.Module, cfg: QuantConfig, tp: TensorParallel) -> None:
    """What tensor parallelism cannot do, said before any process group or capture."""
    from zqcompile.errors import ConfigError
    from zqcompile.parallel import check_shardable
    if cfg.accuracy_budget is not None:
        raise ConfigError(f"tp={tp.size} with accuracy_budget is not supported: its sensitivity search runs on "
                          f"whole GEMMs; choose the FP16 GEMMs without tp and pass them as overrides")
    if cfg.feature_scales is not None:
        raise ConfigError(f"tp={tp.size} with feature-wise scales ({cfg.name}) is not supported: their search runs "
                          f"on whole GEMMs; use preset 'w8a8' or another without feature_scales, or run without tp")
    check_shardable(model, tp.size)


def _shard(model: nn.Module, cfg: QuantConfig, tp: TensorParallel, example_inputs, example_kwargs, calibration_data):
    """Join the process group, check that every rank compiles the same thing, and shard the model for this rank
    (inputs moved to the rank's device)."""
    from zqcompile.parallel import agree, join, shard_model
    param = next(model.parameters())
    rank = join(tp, param.device)
    shapes = repr([(n, tuple(p.shape)) for n, p in model.named_parameters()]).encode()
    agree(rank, "the model, config and example inputs",
          (type(model).__name__, hashlib.sha256(shapes).hexdigest()[:16], cfg.name, repr(cfg.overrides),
           [tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)]))
    part, shards = shard_model(model, rank)
    move = lambda ts: type(ts)(t.to(rank.device) if isinstance(t, torch.Tensor) else t for t in ts)  # noqa: E731
    kwargs = {k: v.to(rank.device) if isinstance(v, torch.Tensor) else v for k, v in (example_kwargs or {}).items()}
    calib = [move(tuple(c)) for c in calibration_data] if calibration_data else calibration_data
    return part, shards, rank, move(tuple(example_inputs)), kwargs or example_kwargs, calib


def compile_folder(path: str | os.PathLike, example_inputs: tuple, config: QuantConfig | str = "w8a8",
                   dtype: torch.dtype = torch.float32, dump_dir: str | os.PathLike | None = None,
                   example_kwargs: dict | None = None, generation: CacheSpec | bool | None = None) -> Engine:
    """`zq.compile` of the Hugging Face safetensors folder `path`, streamed: the model is built with placeholder
    parameters, captured and compiled on them, then each transformer block's tensors are read from the folder
    onto the device of `example_inputs` (in `dtype`), quantized and dropped before the next block, so neither
    device nor host memory ever holds the whole float model (zqcompile/streaming.py). The engine equals
    `zq.compile(load_model(path, dtype=dtype).to(device), example_inputs, config, ...)` bit for bit.

    Configurations that calibrate on activations through the whole model (feature-wise scales, static
    ranges, an accuracy budget) raise ConfigError before anything is loaded: load the model and call zq.compile
    for those.
    """
    from zqcompile.streaming import Materializer, check_streamable, skeleton
    cfg = get_config(config)
    check_streamable(cfg, "load the model and call zq.compile(model, ...)")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"dtype must be a floating torch.dtype (torch.float32, torch.float16, ...), got {dtype!r}")
    example_inputs, example_kwargs = _check_inputs(example_inputs, example_kwargs, generation, dump_dir)
    tensors = [t for t in (*example_inputs, *(example_kwargs or {}).values()) if isinstance(t, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    with peak_memory() as peak:
        sk = skeleton(os.fspath(path), dtype, device)
        materialize = Materializer(sk, device)
        engine = _compile(sk.model, cfg, example_inputs, example_kwargs, None, generation, materialize=materialize)
    engine.record.source = os.path.abspath(path)  # its tokenizer files are there (an export copies them)
    engine.record.memory = {**peak, "engine_bytes": engine.memory_bytes(), **materialize.stats()}
    if dump_dir is not None:
        dump(engine, dump_dir)
    return engine


def _check_inputs(example_inputs, example_kwargs: dict | None, generation, dump_dir) -> tuple[tuple, dict | None]:
    """The checks every compile makes on its inputs before any long work; returns (example_inputs as a tuple,
    example_kwargs), a tokenizer's dict given as example_inputs becoming the keyword inputs."""
    if generation is not None and not isinstance(generation, (bool, CacheSpec)):
        raise InputError(f"generation must be a zqcompile.CacheSpec, True/None (the default cache) or False, "
                         f"got {type(generation).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):  # a tokenizer's BatchEncoding: its tensors are forward's keyword inputs
        if example_kwargs:
            raise InputError("give the inputs once: a dict as example_inputs, or example_kwargs, not both")
        example_inputs, example_kwargs = (), dict(example_inputs)
    if not isinstance(example_inputs, (tuple, list)):
        raise InputError(f"example_inputs must be a tuple of tensors, got {type(example_inputs).__name__}")
    given = [("positional input %d" % i, t) for i, t in enumerate(example_inputs)] + list((example_kwargs or {}).items())
    shapes = {tuple(t.shape[:2]) for _, t in given if isinstance(t, torch.Tensor) and t.dim() >= 2}
    if len(shapes) > 1:  # the engine shares one batch and one sequence dim across its inputs: say so before capture
        raise InputError("example inputs disagree on (batch, seq): "
                         f"{ {n: tuple(t.shape) for n, t in given if isinstance(t, torch.Tensor)} }")
    if dump_dir is not None:
        from zqcompile.graph_dump import check_dump_dir
        check_dump_dir(dump_dir)
    return tuple(example_inputs), example_kwargs


def _compile(model: nn.Module, cfg: QuantConfig, example_inputs, example_kwargs, calibration_data,
             generation: CacheSpec | bool | None, shards: dict | None = None, stored_weights: dict | None = None,
             materialize: Callable[[list[fx.GraphModule], SharedConstants], None] | None = None) -> Engine:
    """Capture, the pipeline and the generation graphs; `materialize` (a streamed compile's) gets every graph
    and their constants' recipes before those are released."""
    with progress.step(f"capturing {type(model).__name__} with torch.export"):
        gm, spec = capture(model, tuple(example_inputs), example_kwargs, (cfg.dynamic_batch, cfg.dynamic_seq))
    outputs = flatten_graph_outputs(gm)  # the engine file then needs no output types registered to load
    bound = spec.bind(tuple(example_inputs), dict(example_kwargs or {}))
    calib = [tuple(spec.bind((), dict(c)) if isinstance(c, Mapping) else spec.bind(tuple(c), {}))
             for c in (calibration_data or [])]
    ctx = PassContext(cfg, tuple(bound), calib, max_seq=spec.max_seq, weight_shards=shards or {},
                      stored_weights=stored_weights or {}, input_names=tuple(spec.names))
    snapshots: list[tuple[str, str, str]] = []

    bar, tick = progress.pass_bar(len(PIPELINE) + 1, f"compiling ({cfg.name})")

    def snap(name, g):
        from zqcompile.graph_dump import graph_html, graph_text
        snapshots.append((name, graph_text(g), graph_html(g, name)))
        tick(name, g)

    with bar:
        records = run_pipeline(gm, ctx, on_pass=snap)
    record = CompileRecord(
        config=cfg.name, model=type(model).__name__,
        gemms=[{"fqn": g.fqn, "role": g.role, "scheme": g.scheme.describe(), "rule": g.rule,
                "shape": list(g.shape), "kernel": g.kernel, "scheme_spec": asdict(g.scheme),
                "parts": [list(p) for p in g.parts]} for g in ctx.gemms],
        passes=[asdict(r) for r in records],
        fusions=[asdict(f) for f in ctx.fusions],
        not_fused=[asdict(n) for n in ctx.not_fused],
        hf_config=_hf_config(model))
    _plan_kernels(gm, record, bound)
    _record_constants(gm, record)
    generator = None
    if generation is not False and is_causal_lm(model):
        from zqcompile.generation.generator import build_generator
        cache = generation if isinstance(generation, CacheSpec) else CacheSpec()
        # the same quantized weights, by construction; the engine graph's pass already warned about the config
        generator = build_generator(model, cfg, cache, ctx.constants, warn=False, weight_shards=shards,
                                    stored_weights=stored_weights)
        record.generation = generator.describe()
    graphs = [gm] + ([generator.prefill, generator.decode] if generator is not None else [])
    if materialize is not None:
        materialize(graphs, ctx.constants)
    ctx.constants.release()
    _drop_autograd(graphs)
    return Engine(gm, spec, record, tuple(bound), snapshots, outputs, generator)


def _measure_budget(engine: Engine, model: nn.Module, cfg: QuantConfig, calibration_data: list[tuple]) -> None:
    """The accuracy budget's outcome through the engine itself, against the float model, on the calibration tokens
    the choice was made on, next to the prediction in the report."""
    import math

    from zqcompile.accuracy.eval import output_tensor
    from zqcompile.passes.budget_metric import metric_for
    from zqcompile.passes.mixed_precision import calibration_tokens, next_token_nll
    ab = cfg.accuracy_budget
    names = engine.input_names
    bound = [tuple(engine.spec.bind((), dict(c)) if isinstance(c, Mapping) else engine.spec.bind(tuple(c), {}))
             for c in calibration_data]
    data = calibration_tokens(bound, ab.max_tokens)
    attr = "logits" if ab.metric == "kl" else "last_hidden_state"

    def fp(*x):
        return model(**dict(zip(names, x)))

    metric = metric_for(ab.metric, names)
    vals, nll = [], [[0.0, 0], [0.0, 0]]  # (summed, count) for the float model, the engine
    with torch.no_grad():
        for x in data:
            ref, out = output_tensor(fp(*x), attr), output_tensor(engine(*x), attr)
            vals.append(metric.values(out, metric.reference(ref, x), x))
            for acc, logits in zip(nll, (ref, out)) if ab.metric == "kl" else ():
                n, c = next_token_nll(logits, x[0])
                acc[0], acc[1] = acc[0] + n, acc[1] + c
    note = f"; measured through the engine {metric.describe(metric.loss(vals))}"
    if ab.metric == "kl":
        p_fp, p_q = (math.exp(n / c) for n, c in nll)
        note += f", calibration perplexity {p_fp:.3f} -> {p_q:.3f} ({p_q / p_fp - 1:+.2%})"
    for f in engine.record.fusions:
        if f["kind"] == "accuracy-budget":
            f["note"] += note


def _drop_autograd(graphs) -> None:
    """A buffer written while a graph was traced or checked (the KV cache) must not keep that autograd history:
    it would hold every float weight upstream of it alive (seen: 30 MiB of float weights left on the GPU by a
    16 MiB W4/8A8 engine). Parameters are left as they are: the float ones are the user's model's own."""
    for g in graphs:
        for t in g.buffers():
            if t.grad_fn is not None:
                t.detach_()
                t.requires_grad_(False)


def _plan_kernels(gm, record: CompileRecord, inputs: tuple) -> None:
    """Record each quantized GEMM's problem (from its final graph node) and plan its kernels per M bucket for the
    device the model was compiled on (the engine plans again when it runs on or moves to another)."""
    from zqcompile.plugins.gemm_plan import plan_record, problem_of_node, record_problems
    problems = {}
    for node in gm.graph.nodes:
        info, problem = node.meta.get("zq_gemm"), problem_of_node(node)
        if info is not None and problem is not None:
            problems.setdefault(info.fqn, problem)
    record_problems(record, problems)
    plan_record(record, next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu")))


def _hf_config(model: nn.Module) -> dict:
    """The model's Hugging Face config as plain JSON data, its class as the architecture ({} for other models)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return {}
    data = json.loads(config.to_json_string(use_diff=False))
    data.pop("quantization_config", None)  # an imported checkpoint's: the engine's own scheme is in the record
    data["architectures"] = [type(model).__name__]
    return data


def _model_source(model: nn.Module) -> str:
    """The folder a Hugging Face model was loaded from (its tokenizer files are there), "" when unknown."""
    path = getattr(model, "name_or_path", "") or ""
    return os.path.abspath(path) if path and os.path.isdir(path) else ""


def _record_constants(gm, record: CompileRecord) -> None:
    """Name in the record, by enginefile.constant_key, the constants each GEMM reads (weight, weight scale, bias)
    and the model parameter behind every other constant of the engine graph, so an export reads the engine's
    tensors back into the model's layers (zqcompile.export.compressed_tensors), also after save and load."""
    from zqcompile.passes.base import arg, param_name, param_offset
    from zqcompile.runtime.enginefile import constant_key
    zq = torch.ops.zq

    def key(n):
        while isinstance(n, torch.fx.Node) and n.target == torch.ops.aten._to_copy.default:
            n = n.args[0]  # an FP GEMM run in another dtype casts its weight and bias
        return constant_key(n.target) if isinstance(n, torch.fx.Node) and n.op == "get_attr" else None

    found = {}
    for node in gm.graph.nodes:
        info = node.meta.get("zq_gemm")
        if info is None or node.op != "call_function" or info.fqn in found:
            continue
        if node.target in (zq.int8_gemm_dequant.default, zq.fp8_gemm_dequant.default, zq.weight_only_gemm.default):
            w, scale, bias = arg(node, "wq"), arg(node, "w_scale"), arg(node, "bias")
        elif node.target == torch.ops.aten.linear.default:
            w, scale, bias = node.args[1], None, arg(node, "bias")
            if isinstance(w, torch.fx.Node) and w.target == zq.dequantize_weight.default:  # not fused with its GEMM
                w, scale = arg(w, "wq"), arg(w, "w_scale")
        else:
            continue
        found[info.fqn] = {"weight": key(w), "weight_scale": key(scale), "bias": key(bias)}
    for g in record.gemms:
        if g["fqn"] in found:
            g["constants"] = found[g["fqn"]]
    read = {k for c in found.values() for k in c.values()}
    floats = [n for n in gm.graph.nodes if n.op == "get_attr" and key(n) not in read]
    record.parameters = {key(n): param_name(n) for n in floats}
    record.parameter_offsets = {key(n): param_offset(n) for n in floats if param_offset(n)}


def dump(engine: Engine, out_dir: str | os.PathLike) -> list[str]:
    from zqcompile.graph_dump import write_dump
    return write_dump(engine, os.fspath(out_dir))


__all__ = ["CacheSpec", "TensorParallel", "compile", "compile_folder", "dump", "load"]
