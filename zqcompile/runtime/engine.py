"""The compiled engine: the transformed GraphModule, how to bind its inputs and rebuild its outputs, and what
the compiler did (plan, pass records, fusions) for reports and dumps. Saving goes through torch.export's
archive format (a zip) with our metadata beside the program; writes are atomic (zqcompile.files), and load
verifies every archive member's stored CRC-32 before trusting any of it, so a damaged file is refused by name
instead of computing different numbers.
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib
from dataclasses import asdict, dataclass, field

import torch
from torch import fx

from zqcompile.capture import InputError, InputSpec, _widen, export_dynamic
from zqcompile.files import atomic_file
from zqcompile.runtime.outputs import OutputStructure
from zqcompile.errors import EngineFileError  # noqa: F401 - raised here, defined there

FORMAT = "zqcompile-engine"
FORMAT_VERSION = 2  # 2: the graph returns flat outputs, rebuilt from meta["outputs"]
META_FILE = "zqcompile.json"


@dataclass
class CompileRecord:
    """What the compiler did, as plain data (saved with the engine and printed by report())."""

    config: str
    model: str
    gemms: list[dict] = field(default_factory=list)
    passes: list[dict] = field(default_factory=list)
    fusions: list[dict] = field(default_factory=list)
    not_fused: list[dict] = field(default_factory=list)


class Engine:
    """Callable like the original model: `engine(input_ids)` returns what `model(input_ids)` returned."""

    def __init__(self, gm: fx.GraphModule, spec: InputSpec, record: CompileRecord, example_inputs: tuple,
                 snapshots: list[tuple[str, str, str]] | None = None, outputs: OutputStructure | None = None):
        self.gm = gm  # returns the output leaves as a flat tuple when `outputs` is set
        self.outputs = outputs
        self.spec = spec
        self.record = record
        self.example_inputs = example_inputs
        self.snapshots = snapshots or []  # (pass name, graph text, graph html) after every pass
        self._gen_source = None  # (model, config) of a causal LM, kept only until the generation graphs exist
        self._generator = None
        self.cuda_graphs = True  # on a CUDA device, replay one CUDA graph per input shape
        self._graphs = None

    @property
    def input_names(self) -> list[str]:
        return self.spec.names

    def __call__(self, *args, **kwargs):
        tensors = self.spec.bind(args, kwargs)
        if tensors[0].is_cuda:
            _ensure_kernels(tensors[0].device)
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
        self.gm.to(device)
        self.example_inputs = tuple(t.to(device) for t in self.example_inputs)
        self._graphs = None
        if self._generator is not None:
            self._generator.to(device, share_with=self.gm)
        return self

    # ---- generation (causal LMs) -------------------------------------------------------------------------
    def keep_generation_source(self, model, config) -> None:
        """Called by compile for causal LMs: generate() builds its prefill/decode graphs from these once."""
        self._gen_source = (model, config)

    def prepare_generation(self, max_batch: int = 8, max_cache_len: int = 512, kv_cache: str = "model"):
        """Build the prefill/decode graphs now, for batches up to `max_batch` and prompt + new tokens up to
        `max_cache_len`; kv_cache "model" (model dtype) or "int8" (per-token-per-head scales)."""
        from zqcompile.generation.generator import build_generator
        from zqcompile.generation.kv_cache import CacheSpec
        if kv_cache not in ("model", "int8"):
            raise InputError(f"kv_cache must be 'model' or 'int8', got {kv_cache!r}")
        if self._gen_source is None:
            raise InputError("this engine cannot generate: it was not compiled from a causal LM, or it was "
                             "saved before prepare_generation() and loaded (a file keeps the generation graphs "
                             "only when they were built before Engine.save)")
        model, config = self._gen_source
        _ensure_kernels(next(iter(model.parameters())).device)
        self._generator = build_generator(model, config, CacheSpec(max_batch, max_cache_len, kv_cache), self.gm)
        return self._generator

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 50,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | list[int] | None = None, seed: int | None = None, streamer=None) -> torch.Tensor:
        """Token ids [batch, prompt + new] (greedy by default); `streamer` gets put(ids)/end() calls like a
        Hugging Face streamer. Rows that hit EOS are padded with the pad token until all rows are done."""
        from zqcompile.generation.sampling import SamplingParams
        gen = self._generator or self.prepare_generation()
        return gen.generate(input_ids, attention_mask, max_new_tokens,
                            SamplingParams(do_sample, temperature, top_k, top_p), eos_token_id, seed, streamer)

    def release_generation_source(self) -> None:
        """Drop the reference to the original float model (after prepare_generation, or if never generating)."""
        self._gen_source = None

    def report(self) -> str:
        from zqcompile.report import format_report
        return format_report(self.record)

    def weight_bytes(self) -> int:
        """Bytes of every constant the graph reads (quantized weights, scales, remaining float params)."""
        from zqcompile.passes.base import get_tensor
        constants = {n.target: get_tensor(self.gm, n) for n in self.gm.graph.nodes if n.op == "get_attr"}
        return sum(t.numel() * t.element_size() for t in constants.values() if t is not None)

    # ---- persistence ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the engine to `path` atomically. An existing file there is replaced only if it is a zqcompile
        engine; anything else (another file, a directory, a device) is refused with OutputPathError. When the
        generation graphs exist (after generate() or prepare_generation()) they are saved too, so the loaded
        engine generates; the file then holds the constants three times (one copy again once loaded)."""
        with atomic_file(path, "engine", replaceable=is_engine_file) as tmp:
            self.write_to(tmp)

    def write_to(self, path: str) -> None:
        """Write the archive to `path` as it is (no checks, not atomic): for callers that stage their outputs
        (zqcompile.files.Staged); everyone else calls save()."""
        ep = self._export()
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "spec": asdict(self.spec),
                "record": asdict(self.record)}
        meta["spec"]["dtypes"] = [str(t).removeprefix("torch.") for t in self.spec.dtypes]
        if self.outputs is not None:
            meta["outputs"] = self.outputs.tree
        programs = {}
        if self._generator is not None:
            programs = self._generator.export_programs()
            meta["generation"] = self._generator.meta()
        from zqcompile import progress
        with progress.step(f"writing the engine ({1 + len(programs)} program(s), "
                           f"{self.weight_bytes() / 2**20:.0f} MiB of constants each)"), open(path, "wb") as f:  # a file object: torch.export wants a '.pt2' name otherwise
            if programs:  # one archive, three programs ("model" is what torch.export.load reads)
                from torch.export.pt2_archive._package import package_pt2
                package_pt2(f, exported_programs={"model": ep, **programs},
                            extra_files={META_FILE: json.dumps(meta)})
            else:
                torch.export.save(ep, f, extra_files={META_FILE: json.dumps(meta)})

    def _export(self) -> torch.export.ExportedProgram:
        from torch.export import Dim
        dims = (None if self.spec.static_batch else Dim("batch", min=1, max=self.spec.max_batch),
                None if self.spec.static_seq else Dim("seq", min=1, max=self.spec.max_seq))
        dyn = tuple({i: d for i, d in zip(range(t.dim()), dims) if d is not None} for t in self.example_inputs)
        dynamic = (dims[0] is not None, dims[1] is not None)
        return export_dynamic(self.gm, tuple(_widen(t, dynamic) for t in self.example_inputs), dyn)


def _ensure_kernels(device: torch.device) -> None:
    """Register the CUDA kernels of the zq ops (warns once when the library is not built)."""
    if device.type == "cuda":
        from zqcompile.plugins import ensure_cuda_kernels
        ensure_cuda_kernels(device)


def is_engine_file(path: str) -> bool:
    """A zip archive holding zqcompile's metadata (the only kind of existing file save() replaces)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/extra/" + META_FILE) for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def verify_archive(path: str) -> None:
    """Read every member of the archive, checking it against the CRC-32 the zip stores for it (and each
    member's local header against the directory); raise EngineFileError naming the damaged part."""
    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise EngineFileError(f"{path!r} is not a readable zqcompile engine: not a zip archive, or its "
                              f"directory (the end of the file) is damaged or missing") from None
    with z:
        for info in z.infolist():
            try:
                with z.open(info) as f:
                    while f.read(1 << 24):
                        pass
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
                raise EngineFileError(f"{path!r} is damaged: {_describe_member(z, info.filename)} fails its "
                                      f"check ({e}); the file was corrupted after it was written: copy or "
                                      f"compile it again") from None


def _describe_member(z: zipfile.ZipFile, member: str) -> str:
    """'constant <name> of the <program> program (<member>)' for a weight file, else the member's name."""
    folder, _, leaf = member.rpartition("/")
    if folder.endswith("data/weights") or folder.endswith("data/constants"):
        for name in z.namelist():
            if name.startswith(folder + "/") and name.endswith("_config.json"):
                try:
                    config = json.loads(z.read(name)).get("config", {})
                except (ValueError, zipfile.BadZipFile, zlib.error):
                    continue
                for const, entry in config.items():
                    if entry.get("path_name") == leaf:
                        program = name.rsplit("/", 1)[1].split("_")[0]
                        return f"constant {const!r} of the {program} program (archive member {member!r})"
    return f"archive member {member!r}"


def load(path: str | os.PathLike) -> Engine:
    """Load an engine written by Engine.save; foreign or corrupt files raise EngineFileError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no engine file at {path!r}")
    from zqcompile import progress
    with progress.step(f"verifying {path}", show=os.path.getsize(path) > 64 << 20):
        verify_archive(path)
    from zqcompile import ops  # noqa: F401 - the zq ops must be registered before the programs are deserialized
    from torch.export.pt2_archive._package import load_pt2
    try:  # one read of the archive: the engine's program, the generation programs if saved, our metadata
        with open(path, "rb") as f:
            contents = load_pt2(f)
        programs = contents.exported_programs
        ep = programs["model"]
    except Exception as e:  # noqa: BLE001 - any failure to parse means not a valid engine
        raise EngineFileError(f"{path!r} is not a readable zqcompile engine ({type(e).__name__}: {e})") from None
    try:
        meta = json.loads(contents.extra_files.get(META_FILE, ""))
        if meta.get("format") != FORMAT:
            raise ValueError("format tag missing")
    except (ValueError, TypeError, AttributeError):
        raise EngineFileError(f"{path!r} is a torch.export archive but not a zqcompile engine") from None
    if meta["version"] > FORMAT_VERSION:
        raise EngineFileError(f"{path!r} was written by a newer zqcompile (format {meta['version']})")
    s = meta["spec"]
    spec = InputSpec(s["names"], [getattr(torch, d) for d in s["dtypes"]], s["ranks"], s["max_batch"],
                     s["max_seq"], s["forward_params"], s.get("static_batch"), s.get("static_seq"))
    record = CompileRecord(**meta["record"])
    gm = ep.module()
    lead = [spec.static_batch or 2, spec.static_seq or 2]
    examples = tuple(torch.zeros((lead + [2] * r)[:r], dtype=dt) for r, dt in zip(spec.ranks, spec.dtypes))
    outputs = OutputStructure(meta["outputs"]) if "outputs" in meta else None
    engine = Engine(gm, spec, record, examples, outputs=outputs)
    if "generation" in meta:
        from zqcompile.generation.generator import Generator
        engine._generator = Generator.from_programs(programs["prefill"].module(), programs["decode"].module(),
                                                    meta["generation"], share_with=gm)
    return engine


__all__ = ["CompileRecord", "Engine", "EngineFileError", "InputError", "is_engine_file", "load", "verify_archive"]
