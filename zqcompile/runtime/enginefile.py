"""The engine file: one zip archive (stored, not compressed) holding every constant once and each graph as a
weight-free torch.export program.

    zqcompile.json          metadata: format, input spec, compile record, output structure, and for every
                            program its input count and the constants it reads, in order
    constants/<i>           raw bytes of constant i (contiguous, little-endian; dtype and shape in the
                            metadata); state (the KV cache) has no bytes and is allocated at load
    programs/<name>.pt2     torch.export.save of the graph with its constants lifted to inputs

The engine, prefill and decode graphs read the same tensors (zqcompile.passes.constants), so a file with
generation graphs costs about what one without does, and load binds every graph to one copy again. The zip
stores a CRC-32 of every member; every member is read, and so checked, before anything is trusted: a damaged
file raises EngineFileError naming the part. Only public torch.export APIs are used (save, load, module()).
"""
from __future__ import annotations

import io
import json
import zipfile
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx

from zqcompile.errors import EngineFileError
from zqcompile.capture import get_tensor

FORMAT = "zqcompile-engine"
FORMAT_VERSION = 3  # 3: one zip, constants stored once, weight-free programs
META_FILE = "zqcompile.json"
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                                       torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
                                                       torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)}


@dataclass
class Program:
    """A graph to save with what torch.export needs to trace it again: example inputs and their dynamic dims."""

    gm: fx.GraphModule
    example_inputs: tuple
    dynamic_shapes: tuple


def _graph_constants(gm: fx.GraphModule) -> list[tuple[fx.Node, torch.Tensor]]:
    out, seen = [], set()
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target not in seen:
            t = get_tensor(gm, n)
            if isinstance(t, torch.Tensor):
                seen.add(n.target)
                out.append((n, t))
    return out


def _lift(gm: fx.GraphModule, constants: list[fx.Node]) -> fx.GraphModule:
    """A copy of gm whose constants are trailing inputs (so torch.export stores no weights)."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = g.placeholder(n.name)
    lifted = set()
    for i, n in enumerate(constants):
        env[n] = g.placeholder(f"zq_constant_{i}")
        lifted.add(n.target)
    for n in gm.graph.nodes:
        if n in env:
            continue
        if n.op == "get_attr" and n.target in lifted:  # a second get_attr of a lifted constant
            env[n] = env[next(c for c in constants if c.target == n.target)]
            continue
        env[n] = g.node_copy(n, lambda a: env[a])
    return fx.GraphModule(gm, g)


def constant_key(target: str) -> str:
    """A graph constant's name as a loaded engine's graph holds it (dots as '__'): the same for a compiled graph's
    get_attr target and a loaded graph's, so a compile record can name constants across save and load."""
    return target.replace(".", "__")


_attr_name = constant_key


def _bind(module: torch.nn.Module, num_inputs: int, tensors: list[tuple[str, torch.Tensor]]) -> fx.GraphModule:
    """The loaded program with its trailing constant inputs turned back into attributes holding `tensors`
    ((attribute name, tensor) pairs, the names as the compiled graph had them, dots as '__')."""
    root = torch.nn.Module()
    for name, sub in module.named_children():
        root.add_module(name, sub)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != num_inputs + len(tensors):
        raise EngineFileError(f"a program takes {len(placeholders)} inputs, the metadata lists "
                              f"{num_inputs} + {len(tensors)} constants")
    for ph in placeholders[:num_inputs]:
        env[ph] = g.placeholder(ph.name)
    for ph, (name, t) in zip(placeholders[num_inputs:], tensors):
        root.register_buffer(name, t)
        env[ph] = g.get_attr(name)
    for n in module.graph.nodes:
        if n not in env:
            env[n] = g.node_copy(n, lambda a: env[a])
    return fx.GraphModule(root, g)


def write_engine(path: str, meta: dict, programs: dict[str, Program],
                 is_state: Callable[[str], bool] = lambda name: False) -> None:
    """Write the archive to `path` (callers make that atomic: zqcompile.files)."""
    from zqcompile.capture import export_dynamic
    entries: dict[int, int] = {}  # id(tensor) -> constant index
    tensors: list[torch.Tensor] = []
    records: list[dict] = []
    meta = dict(meta, format=FORMAT, version=FORMAT_VERSION, programs={})
    exported: dict[str, bytes] = {}
    for name, prog in programs.items():
        consts = _graph_constants(prog.gm)
        order = []
        for node, t in consts:
            if id(t) not in entries:
                entries[id(t)] = len(tensors)
                tensors.append(t)
                records.append({"name": node.target, "dtype": str(t.dtype).removeprefix("torch."),
                                "shape": list(t.shape), "state": is_state(node.target.rsplit(".", 1)[-1])})
            order.append([entries[id(t)], _attr_name(node.target)])
        lifted = _lift(prog.gm, [n for n, _ in consts])
        args = (*prog.example_inputs, *(t for _, t in consts))
        ep = export_dynamic(lifted, args, (*prog.dynamic_shapes, *([None] * len(consts))))
        ep.example_inputs = None  # the constants would be stored again as sample inputs
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        exported[name] = buf.getvalue()
        meta["programs"][name] = {"inputs": len(prog.example_inputs), "constants": order}
    meta["constants"] = records
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        z.writestr(META_FILE, json.dumps(meta))
        for i, (t, rec) in enumerate(zip(tensors, records)):
            if not rec["state"]:
                with z.open(f"constants/{i}", "w", force_zip64=True) as f:
                    f.write(memoryview(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy()))
        for name, data in exported.items():
            z.writestr(f"programs/{name}.pt2", data)


def _read(z: zipfile.ZipFile, path: str, member: str, what: str) -> bytes:
    try:
        return z.read(member)
    except KeyError:
        raise EngineFileError(f"{path!r} is damaged: {what} (archive member {member!r}) is missing") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise EngineFileError(f"{path!r} is damaged: {what} (archive member {member!r}) fails its check ({e}); "
                              f"the file was corrupted after it was written: copy or compile it again") from None


def read_meta(z: zipfile.ZipFile, path: str) -> dict:
    names = z.namelist()
    if META_FILE not in names:
        if any(n.endswith("/extra/" + META_FILE) for n in names):  # formats 1 and 2: a torch.export archive
            raise EngineFileError(f"{path!r} was written by an older zqcompile (engine format 1 or 2, this one "
                                  f"reads {FORMAT_VERSION}): compile the model again")
        raise EngineFileError(f"{path!r} is a zip archive but not a zqcompile engine (no {META_FILE})")
    try:
        meta = json.loads(_read(z, path, META_FILE, "the metadata"))
    except ValueError:
        raise EngineFileError(f"{path!r} is damaged: its metadata is not readable JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise EngineFileError(f"{path!r} is a zip archive but not a zqcompile engine")
    if meta.get("version") != FORMAT_VERSION:
        newer = isinstance(meta.get("version"), int) and meta["version"] > FORMAT_VERSION
        raise EngineFileError(f"{path!r} was written by a {'newer' if newer else 'older'} zqcompile (engine format "
                              f"{meta.get('version')}, this one reads {FORMAT_VERSION}): "
                              f"{'upgrade zqcompile' if newer else 'compile the model again'}")
    return meta


def read_engine(path: str) -> tuple[dict, dict[str, fx.GraphModule]]:
    """The metadata and every program as a GraphModule, all bound to one copy of the constants."""
    from zqcompile import ops  # noqa: F401 - the zq ops must be registered before the programs are read
    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise EngineFileError(f"{path!r} is not a readable zqcompile engine: not a zip archive, or its directory "
                              f"(the end of the file) is damaged or missing") from None
    with z:
        meta = read_meta(z, path)
        tensors = []
        for i, rec in enumerate(meta["constants"]):
            dtype, shape = _DTYPES.get(rec["dtype"]), tuple(rec["shape"])
            if dtype is None:
                raise EngineFileError(f"{path!r}: constant {rec['name']!r} has an unknown dtype {rec['dtype']!r}")
            if rec["state"]:
                tensors.append(torch.zeros(shape, dtype=dtype))
                continue
            data = _read(z, path, f"constants/{i}", f"constant {rec['name']!r}")
            t = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
            tensors.append(t.view(dtype).reshape(shape))
        graphs = {}
        for name, prog in meta["programs"].items():
            data = _read(z, path, f"programs/{name}.pt2", f"the {name} program")
            try:
                module = torch.export.load(io.BytesIO(data)).module()
            except Exception as e:  # noqa: BLE001 - a program torch cannot read is a damaged or foreign file
                raise EngineFileError(f"{path!r}: the {name} program cannot be read ({type(e).__name__}: "
                                      f"{str(e)[:200]})") from None
            graphs[name] = _bind(module, prog["inputs"], [(attr, tensors[i]) for i, attr in prog["constants"]])
    return meta, graphs


def is_engine_file(path: str) -> bool:
    """A zip archive holding zqcompile's metadata (the only kind of existing file Engine.save replaces)."""
    try:
        with zipfile.ZipFile(path) as z:
            return META_FILE in z.namelist() or any(n.endswith("/extra/" + META_FILE) for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
