"""Public entry points: compile, compile_folder, dump, load. compile = validate -> (LKD) -> capture -> pass
pipeline -> Engine; compile_folder does the same on a safetensors folder's skeleton, then streams its weights."""
from __future__ import annotations

import os
from dataclasses import asdict
from typing import Callable

import torch
from torch import fx, nn

from zqcompile.capture import InputError, capture
from zqcompile.config import LKDConfig, QuantConfig, get_config
from zqcompile.generation.generator import is_causal_lm
from zqcompile.generation.kv_cache import CacheSpec
from zqcompile.memory import peak_memory
from zqcompile.runtime.engine import CompileRecord, Engine, load
from zqcompile.runtime.outputs import flatten_graph_outputs
from zqcompile import progress
from zqcompile.passes import PIPELINE, PassContext, run_pipeline
from zqcompile.passes.constants import SharedConstants


def compile(model: nn.Module, example_inputs: tuple, config: QuantConfig | str = "w8a8",
            dump_dir: str | os.PathLike | None = None, lkd: LKDConfig | None = None,
            calibration_data: list[tuple] | None = None, example_kwargs: dict | None = None,
            generation: CacheSpec | bool | None = None) -> Engine:
    """Quantize and fuse `model` into a ZeroQuant engine.

    example_inputs: positional inputs of model.forward (e.g. `(input_ids,)`), used to capture the graph with
    dynamic batch and sequence length. config: a preset name (see zqcompile.PRESETS) or a QuantConfig.
    calibration_data: input tuples for static ("ptq-static") activation ranges; defaults to example_inputs.
    lkd: run layer-by-layer knowledge distillation on the weights first (ZeroQuant Sec. 4.2).
    generation (causal LMs): the KV cache the prefill/decode graphs of `engine.generate` are built for, here,
    sharing the engine's quantized weights: a CacheSpec, None for CacheSpec() (batches up to 8, 512 tokens),
    False for none. The engine keeps no reference to `model`.
    """
    cfg = get_config(config)
    if isinstance(model, (str, os.PathLike)):
        raise InputError(f"model must be a torch.nn.Module, got the path {os.fspath(model)!r}: to compile a "
                         f"safetensors folder block by block without loading it, call zq.compile_folder(path, ...)")
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    example_inputs = _check_inputs(example_inputs, example_kwargs, generation, dump_dir)
    model = model.eval()
    if lkd is not None:
        from zqcompile.accuracy.lkd import run_lkd
        model = run_lkd(model, cfg, lkd)
    with peak_memory() as peak:
        engine = _compile(model, cfg, example_inputs, example_kwargs, calibration_data, generation)
    engine.record.memory = {**peak, "engine_bytes": engine.memory_bytes()}
    if dump_dir is not None:
        dump(engine, dump_dir)
    return engine


def compile_folder(path: str | os.PathLike, example_inputs: tuple, config: QuantConfig | str = "w8a8",
                   dtype: torch.dtype = torch.float32, dump_dir: str | os.PathLike | None = None,
                   example_kwargs: dict | None = None, generation: CacheSpec | bool | None = None) -> Engine:
    """`zq.compile` of the Hugging Face safetensors folder `path`, streamed: the model is built with placeholder
    parameters, captured and compiled on them, then each transformer block's tensors are read from the folder
    onto the device of `example_inputs` (in `dtype`), quantized and dropped before the next block, so neither
    device nor host memory ever holds the whole float model (zqcompile/streaming.py). The engine equals
    `zq.compile(load_model(path, dtype=dtype).to(device), example_inputs, config, ...)` bit for bit.

    Configurations that calibrate on activations through the whole model (feature-wise scales, static
    ranges) raise ConfigError before anything is loaded: load the model and call zq.compile for those.
    """
    from zqcompile.streaming import Materializer, check_streamable, skeleton
    cfg = get_config(config)
    check_streamable(cfg, "load the model and call zq.compile(model, ...)")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"dtype must be a floating torch.dtype (torch.float32, torch.float16, ...), got {dtype!r}")
    example_inputs = _check_inputs(example_inputs, example_kwargs, generation, dump_dir)
    tensors = [t for t in (*example_inputs, *(example_kwargs or {}).values()) if isinstance(t, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    with peak_memory() as peak:
        sk = skeleton(os.fspath(path), dtype, device)
        materialize = Materializer(sk, device)
        engine = _compile(sk.model, cfg, example_inputs, example_kwargs, None, generation, materialize)
    engine.record.memory = {**peak, "engine_bytes": engine.memory_bytes(), **materialize.stats()}
    if dump_dir is not None:
        dump(engine, dump_dir)
    return engine


def _check_inputs(example_inputs, example_kwargs: dict | None, generation, dump_dir) -> tuple:
    """The checks every compile makes before any long work; returns example_inputs as a tuple."""
    if generation is not None and not isinstance(generation, (bool, CacheSpec)):
        raise InputError(f"generation must be a zqcompile.CacheSpec, True/None (the default cache) or False, "
                         f"got {type(generation).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
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
    return tuple(example_inputs)


def _compile(model: nn.Module, cfg: QuantConfig, example_inputs, example_kwargs, calibration_data,
             generation: CacheSpec | bool | None,
             materialize: Callable[[list[fx.GraphModule], SharedConstants], None] | None = None) -> Engine:
    """Capture, the pipeline and the generation graphs; `materialize` (a streamed compile's) gets every graph
    and their constants' recipes before those are released."""
    with progress.step(f"capturing {type(model).__name__} with torch.export"):
        gm, spec = capture(model, tuple(example_inputs), example_kwargs, (cfg.dynamic_batch, cfg.dynamic_seq))
    outputs = flatten_graph_outputs(gm)  # the engine file then needs no output types registered to load
    bound = spec.bind(tuple(example_inputs), dict(example_kwargs or {}))
    calib = [tuple(spec.bind(tuple(c), {})) for c in (calibration_data or [])]
    ctx = PassContext(cfg, tuple(bound), calib, max_seq=spec.max_seq)
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
                "shape": list(g.shape), "kernel": g.kernel} for g in ctx.gemms],
        passes=[asdict(r) for r in records],
        fusions=[asdict(f) for f in ctx.fusions],
        not_fused=[asdict(n) for n in ctx.not_fused])
    _plan_kernels(gm, record, bound)
    generator = None
    if generation is not False and is_causal_lm(model):
        from zqcompile.generation.generator import build_generator
        cache = generation if isinstance(generation, CacheSpec) else CacheSpec()
        # the same quantized weights, by construction; the engine graph's pass already warned about the config
        generator = build_generator(model, cfg, cache, ctx.constants, warn=False)
        record.generation = generator.describe()
    graphs = [gm] + ([generator.prefill, generator.decode] if generator is not None else [])
    if materialize is not None:
        materialize(graphs, ctx.constants)
    ctx.constants.release()
    _drop_autograd(graphs)
    return Engine(gm, spec, record, tuple(bound), snapshots, outputs, generator)


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


def dump(engine: Engine, out_dir: str | os.PathLike) -> list[str]:
    from zqcompile.graph_dump import write_dump
    return write_dump(engine, os.fspath(out_dir))


__all__ = ["CacheSpec", "compile", "compile_folder", "dump", "load"]
