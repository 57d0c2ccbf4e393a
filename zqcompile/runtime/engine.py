"""The compiled engine: the transformed full-sequence graph, how to bind its inputs and rebuild its outputs,
for causal LMs the prefill/decode graphs of generation (all three reading one copy of every constant), and
what the compiler did (plan, pass records, fusions, memory) for reports and dumps. Files are written
atomically (zqcompile.files) in the format of runtime/enginefile.py; load checks every byte against its
stored checksum before trusting any of it.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import fx

from zqcompile.capture import InputSpec, _widen
from zqcompile.errors import EngineFileError, InputError  # noqa: F401 - raised here, defined there
from zqcompile.files import atomic_file
from zqcompile.runtime.constants import move_constants, tensor_bytes, unique_tensors
from zqcompile.runtime.enginefile import Program, is_engine_file, read_engine, write_engine
from zqcompile.runtime.outputs import OutputStructure


@dataclass
class CompileRecord:
    """What the compiler did, as plain data (saved with the engine and printed by report())."""

    config: str
    model: str
    gemms: list[dict] = field(default_factory=list)
    passes: list[dict] = field(default_factory=list)
    fusions: list[dict] = field(default_factory=list)
    not_fused: list[dict] = field(default_factory=list)
    memory: dict = field(default_factory=dict)  # compile peaks and what the engine holds, in bytes
    generation: str = ""  # what the prefill/decode graphs are (empty: none)
    tensor_parallel: str = ""  # "rank r of n (backend, device)" for one rank's shard (empty: one process)
    # What a checkpoint export needs (export/compressed_tensors.py): the model's Hugging Face config, the folder or
    # file it was loaded from ("" when unknown), and the model parameter each float constant of the engine graph
    # holds (enginefile.constant_key(target) -> parameter name; folded feature scales keep their norm's name), and
    # what a constant adds to its parameter where it is not the parameter itself (Gemma's norms hold 1 + weight).
    hf_config: dict = field(default_factory=dict)
    source: str = ""
    parameters: dict = field(default_factory=dict)
    parameter_offsets: dict = field(default_factory=dict)


class Engine:
    """Callable like the original model: `engine(input_ids)` returns what `model(input_ids)` returned; a tokenizer's
    output is taken as it is, `engine(batch)` or `engine(**batch)`."""

    def __init__(self, gm: fx.GraphModule, spec: InputSpec, record: CompileRecord, example_inputs: tuple,
                 snapshots: list[tuple[str, str, str]] | None = None, outputs: OutputStructure | None = None,
                 generator=None):
        self.gm = gm  # returns the output leaves as a flat tuple when `outputs` is set
        self.outputs = outputs
        self.spec = spec
        self.record = record
        self.example_inputs = example_inputs
        self.snapshots = snapshots or []  # (pass name, graph text, graph html) after every pass
        self._generator = generator  # the prefill/decode pair (zqcompile.generation), sharing gm's constants
        self.cuda_graphs = True  # on a CUDA device, replay one CUDA graph per input shape
        self._graphs = None
        self._kernels_for: torch.device | None = None  # the device the kernels were loaded and planned for

    @property
    def input_names(self) -> list[str]:
        return self.spec.names

    @property
    def graphs(self) -> list[fx.GraphModule]:
        """Every graph of the engine (they share constants)."""
        return [self.gm] + ([self._generator.prefill, self._generator.decode] if self._generator else [])

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and isinstance(args[0], Mapping) and not kwargs:  # a tokenizer's BatchEncoding / dict
            args, kwargs = (), dict(args[0])
        tensors = self.spec.bind(args, kwargs)
        if tensors[0].is_cuda and tensors[0].device != self._kernels_for:
            _ensure_kernels(tensors[0].device, self.record)
            self._kernels_for = tensors[0].device
        if self.cuda_graphs and tensors[0].is_cuda:
            if self._graphs is None:
                from zqcompile.runtime.cuda_graphs import ShapeBucketedGraphs
                self._graphs = ShapeBucketedGraphs(self.gm)
            out = self._graphs(*tensors)
        else:
            with torch.no_grad():
                out = self.gm(*tensors)
        return self.outputs.rebuild(out) if self.outputs is not None else out

    def to(self, device: str | torch.device) -> "Engine":
        """Move every graph's constants (each shared tensor once, still shared) and the KV cache."""
        move_constants(self.graphs, device)
        _ensure_kernels(torch.device(device), self.record)
        self._kernels_for = None  # the plan is now for `device`: the next CUDA call re-checks it
        self.example_inputs = tuple(t.to(device) for t in self.example_inputs)
        self._graphs = None
        if self._generator is not None:
            self._generator.reset_runners()
        return self

    # ---- generation (causal LMs) -------------------------------------------------------------------------
    def prepare_generation(self, max_batch: int = 1, max_cache_len: int = 2, kv_cache: str | None = None):
        """The generator, checked to take batches up to `max_batch` and `max_cache_len` tokens with a
        `kv_cache` cache ("model" or "int8"; None: the one it was compiled with). Its graphs are built by compile
        (`generation=zq.CacheSpec(...)`): the float model is not kept, so a larger cache needs a new compile."""
        if kv_cache is None and self._generator is not None:
            kv_cache = self._generator.spec.kv_dtype
        if kv_cache not in (None, "model", "int8"):
            raise InputError(f"kv_cache must be 'model' or 'int8', got {kv_cache!r}")
        gen = self._generator
        if gen is None:
            raise InputError("this engine has no generation graphs: it was not compiled from a causal LM, or with "
                             "generation=False; compile with generation=zq.CacheSpec(max_batch=..., "
                             "max_cache_len=...)")
        s = gen.spec
        if max_batch > s.max_batch or max_cache_len > s.max_cache_len or kv_cache != s.kv_dtype:
            raise InputError(f"this engine's generation graphs take batches up to {s.max_batch} and "
                             f"{s.max_cache_len} tokens with a {s.kv_dtype!r} KV cache; for batch {max_batch}, "
                             f"{max_cache_len} tokens and a {kv_cache!r} cache compile with "
                             f"generation=zq.CacheSpec(max_batch={max_batch}, max_cache_len={max_cache_len}, "
                             f"kv_dtype={kv_cache!r})")
        return gen

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 50,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | list[int] | None = None, seed: int | None = None, streamer=None) -> torch.Tensor:
        """Token ids [batch, prompt + new] (greedy by default); `streamer` gets put(ids)/end() calls like a
        Hugging Face streamer. Rows that hit EOS are padded with the pad token until all rows are done."""
        from zqcompile.generation.sampling import SamplingParams
        gen = self.prepare_generation()
        _ensure_kernels(gen.device, self.record)
        return gen.generate(input_ids, attention_mask, max_new_tokens,
                            SamplingParams(do_sample, temperature, top_k, top_p), eos_token_id, seed, streamer)

    # ---- what it holds -----------------------------------------------------------------------------------
    def report(self) -> str:
        from zqcompile.report import format_report
        return format_report(self.record)

    def weight_bytes(self) -> int:
        """Bytes of every constant the full-sequence graph reads (quantized weights, scales, float params)."""
        return tensor_bytes(unique_tensors([self.gm]))

    def memory_bytes(self) -> int:
        """Bytes the engine holds: every constant of every graph once, the KV cache included."""
        return tensor_bytes(unique_tensors(self.graphs))

    # ---- persistence ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the engine to `path` atomically. An existing file there is replaced only if it is a zqcompile
        engine; anything else (another file, a directory, a device) is refused with OutputPathError. Every
        constant is stored once, whatever number of graphs read it (the KV cache is not stored)."""
        with atomic_file(path, "engine", replaceable=is_engine_file) as tmp:
            self.write_to(tmp)

    def write_to(self, path: str) -> None:
        """Write the archive to `path` as it is (no checks, not atomic): for callers that stage their outputs
        (zqcompile.files.Staged); everyone else calls save()."""
        from zqcompile import progress
        if self.record.tensor_parallel:
            raise InputError(f"this engine is {self.record.tensor_parallel}'s shard (tensor parallel); saving shards "
                             f"is not supported yet: compile with tp= in each rank's process instead")
        meta = {"spec": asdict(self.spec), "record": asdict(self.record),
                "outputs": self.outputs.tree if self.outputs is not None else None}
        meta["spec"]["dtypes"] = [str(t).removeprefix("torch.") for t in self.spec.dtypes]
        programs = {"model": self._program()}
        is_state = lambda name: False  # noqa: E731
        if self._generator is not None:
            from zqcompile.generation.kv_cache import is_cache_buffer
            programs.update(self._generator.programs())
            meta["generation"] = self._generator.meta()
            is_state = is_cache_buffer
        with progress.step(f"writing the engine ({len(programs)} program(s), "
                           f"{self.memory_bytes() / 2**20:.0f} MiB of constants)"):
            write_engine(path, meta, programs, is_state)

    def _program(self) -> Program:
        from torch.export import Dim
        dims = (None if self.spec.static_batch else Dim("batch", min=1, max=self.spec.max_batch),
                None if self.spec.static_seq else Dim("seq", min=1, max=self.spec.max_seq))
        dyn = tuple({i: d for i, d in zip(range(t.dim()), dims) if d is not None} for t in self.example_inputs)
        dynamic = (dims[0] is not None, dims[1] is not None)
        return Program(self.gm, tuple(_widen(t, dynamic) for t in self.example_inputs), dyn)


def _ensure_kernels(device: torch.device, record: CompileRecord | None = None) -> None:
    """Register the CUDA kernels of the zq ops (warns once when the library is not built); plan the record's GEMM
    kernels for `device` (plugins/gemm_plan.py; a no-op when already planned for it)."""
    if device.type == "cuda":
        from zqcompile.plugins import ensure_cuda_kernels
        ensure_cuda_kernels(device)
    if record is not None:
        from zqcompile.plugins.gemm_plan import plan_record
        plan_record(record, device)


def load(path: str | os.PathLike) -> Engine:
    """Load an engine written by Engine.save (in any process); foreign or damaged files raise EngineFileError."""
    from zqcompile import progress
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no engine file at {path!r}")
    with progress.step(f"reading and verifying {path}", show=os.path.getsize(path) > 64 << 20):
        meta, graphs = read_engine(path)
    s = meta["spec"]
    spec = InputSpec(s["names"], [getattr(torch, d) for d in s["dtypes"]], s["ranks"], s["max_batch"],
                     s["max_seq"], s["forward_params"], s.get("static_batch"), s.get("static_seq"))
    record = CompileRecord(**meta["record"])
    lead = [spec.static_batch or 2, spec.static_seq or 2]
    examples = tuple(torch.zeros((lead + [2] * r)[:r], dtype=dt) for r, dt in zip(spec.ranks, spec.dtypes))
    outputs = OutputStructure(meta["outputs"]) if meta.get("outputs") else None
    generator = None
    if "generation" in meta:
        from zqcompile.generation.generator import Generator
        generator = Generator.from_meta(graphs["prefill"], graphs["decode"], meta["generation"])
    return Engine(graphs["model"], spec, record, examples, outputs=outputs, generator=generator)


__all__ = ["CompileRecord", "Engine", "EngineFileError", "InputError", "is_engine_file", "load"]
