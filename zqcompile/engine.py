"""The compiled engine: the transformed GraphModule, how to bind its inputs, and what the compiler did
(plan, pass records, fusions) for reports and dumps. Saving goes through torch.export's archive format with
our metadata beside the program; writes are atomic.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field

import torch
from torch import fx

from .capture import InputError, InputSpec

FORMAT = "zqcompile-engine"
FORMAT_VERSION = 1
META_FILE = "zqcompile.json"


class EngineFileError(ValueError):
    """A file that is not a (readable) zqcompile engine."""


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
                 snapshots: list[tuple[str, str, str]] | None = None):
        self.gm = gm
        self.spec = spec
        self.record = record
        self.example_inputs = example_inputs
        self.snapshots = snapshots or []  # (pass name, graph text, graph html) after every pass
        self.cuda_graphs = True  # on a CUDA device, replay one CUDA graph per input shape
        self._graphs = None

    @property
    def input_names(self) -> list[str]:
        return self.spec.names

    def __call__(self, *args, **kwargs):
        tensors = self.spec.bind(args, kwargs)
        if self.cuda_graphs and tensors[0].is_cuda:
            if self._graphs is None:
                from .backends.cuda_graphs import ShapeBucketedGraphs
                self._graphs = ShapeBucketedGraphs(self.gm)
            return self._graphs(*tensors)
        with torch.no_grad():
            return self.gm(*tensors)

    def to(self, device: str | torch.device) -> "Engine":
        self.gm.to(device)
        self.example_inputs = tuple(t.to(device) for t in self.example_inputs)
        self._graphs = None
        return self

    def report(self) -> str:
        from .report import format_report
        return format_report(self.record)

    def weight_bytes(self) -> int:
        """Bytes of every constant the graph reads (quantized weights, scales, remaining float params)."""
        seen, total = set(), 0
        for n in self.gm.graph.nodes:
            if n.op == "get_attr" and n.target not in seen:
                seen.add(n.target)
                obj = self.gm
                for p in n.target.split("."):
                    obj = getattr(obj, p)
                if isinstance(obj, torch.Tensor):
                    total += obj.numel() * obj.element_size()
        return total

    # ---- persistence ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        d = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(d):
            raise OSError(f"cannot save engine to {path!r}: directory {d!r} does not exist")
        if not os.access(d, os.W_OK):
            raise OSError(f"cannot save engine to {path!r}: directory {d!r} is not writable")
        ep = self._export()
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "spec": asdict(self.spec),
                "record": asdict(self.record)}
        meta["spec"]["dtypes"] = [str(t).removeprefix("torch.") for t in self.spec.dtypes]
        fd, tmp = tempfile.mkstemp(prefix=".zq-", suffix=".tmp", dir=d)
        os.close(fd)
        try:
            with open(tmp, "wb") as f:  # a file object: torch.export wants a '.pt2' name otherwise
                torch.export.save(ep, f, extra_files={META_FILE: json.dumps(meta)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _export(self) -> torch.export.ExportedProgram:
        from torch.export import Dim
        batch = Dim("batch", min=1, max=self.spec.max_batch)
        seq = Dim("seq", min=1, max=self.spec.max_seq)
        dyn = tuple({i: d for i, d in zip(range(t.dim()), (batch, seq))} for t in self.example_inputs)
        args = tuple(_widen_cpu(t) for t in self.example_inputs)
        with torch.no_grad():
            return torch.export.export(self.gm, args, dynamic_shapes=dyn, strict=False)


def _widen_cpu(t: torch.Tensor) -> torch.Tensor:
    from .capture import _widen
    return _widen(t)


def load(path: str | os.PathLike) -> Engine:
    """Load an engine written by Engine.save; foreign or corrupt files raise EngineFileError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no engine file at {path!r}")
    extra = {META_FILE: ""}
    try:
        with open(path, "rb") as f:
            ep = torch.export.load(f, extra_files=extra)
    except Exception as e:  # noqa: BLE001 - any failure to parse means not a valid engine
        raise EngineFileError(f"{path!r} is not a readable zqcompile engine ({type(e).__name__}: {e})") from None
    try:
        meta = json.loads(extra[META_FILE])
        if meta.get("format") != FORMAT:
            raise ValueError("format tag missing")
    except (ValueError, TypeError, AttributeError):
        raise EngineFileError(f"{path!r} is a torch.export archive but not a zqcompile engine") from None
    if meta["version"] > FORMAT_VERSION:
        raise EngineFileError(f"{path!r} was written by a newer zqcompile (format {meta['version']})")
    s = meta["spec"]
    spec = InputSpec(s["names"], [getattr(torch, d) for d in s["dtypes"]], s["ranks"], s["max_batch"],
                     s["max_seq"], s["forward_params"])
    record = CompileRecord(**meta["record"])
    gm = ep.module()
    examples = tuple(torch.zeros([2] * r, dtype=dt) for r, dt in zip(spec.ranks, spec.dtypes))
    return Engine(gm, spec, record, examples)


__all__ = ["CompileRecord", "Engine", "EngineFileError", "InputError", "load"]
