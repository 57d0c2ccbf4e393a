"""Graph dumps: after every pass, the graph as readable text and as a self-contained HTML page with an SVG
picture (zq ops coloured by their declared category, FP GEMMs apart, labelled with module FQNs), plus the
fusion table and the report. A dump writes a manifest (zqcompile-dump.json) listing its files and never
touches anything else: the target must be new, empty, or an earlier dump (whose listed files it replaces;
files the user added there are kept). Everything is written into a temporary folder first and moved into
place at the end, so a failed or interrupted dump leaves nothing half-written."""
from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
from torch import fx

from zqcompile.capture import fqn_of
from zqcompile.files import TMP_PREFIX, OutputPathError
from zqcompile.ops import registry

MANIFEST = "zqcompile-dump.json"

# one colour per op category of zqcompile.ops.registry.CATEGORIES, plus FP GEMMs and everything else
COLOURS = {"fused": "#7fd17f", "quant": "#8fb8ff", "attention": "#c9a7ff", "fp_gemm": "#ffb36b", "qdq": "#ff8080",
           "collective": "#f2d16b", "other": "#e8e8e8"}
_HIDDEN = {"getitem", "sym_size", "_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"}


def _op_name(n: fx.Node) -> str:
    if n.op != "call_function":
        return n.op if n.op != "get_attr" else f"get_attr {n.target}"
    t = n.target
    if hasattr(t, "name") and callable(t.name):
        return t.name()
    return getattr(t, "__name__", str(t))


def category(n: fx.Node) -> str:
    """A zq op's declared category (zqcompile/ops/library.py), "fp_gemm" for GEMMs the plan keeps in float,
    else "other"."""
    decl = registry.lookup(n.target) if n.op == "call_function" else None
    if decl is not None:
        return decl.category
    name = _op_name(n).split("::")[-1].split(".")[0]
    if name in ("linear", "addmm", "mm", "matmul") and "zq_gemm" in n.meta:
        return "fp_gemm"
    return "other"


def _shape(n: fx.Node) -> str:
    v = n.meta.get("val")
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}"
    return ""


def graph_text(gm: fx.GraphModule) -> str:
    lines = []
    for n in gm.graph.nodes:
        args = ", ".join(str(a) for a in n.args)
        fqn = fqn_of(n)
        tag = category(n)
        extra = f"  # {fqn}" if fqn else ""
        extra += f" [{tag}]" if tag != "other" else ""
        lines.append(f"{n.name} = {_op_name(n)}({args}) -> {_shape(n)}{extra}")
    return "\n".join(lines) + "\n"


def graph_html(gm: fx.GraphModule, title: str) -> str:
    nodes = [n for n in gm.graph.nodes
             if n.op in ("call_function", "placeholder", "output") and _op_name(n).split(".")[0] not in _HIDDEN
             and not _op_name(n).startswith("aten::sym_size")]
    index = {n: i for i, n in enumerate(nodes)}
    row, x0, w = 26, 260, 520
    height = row * len(nodes) + 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{x0 + w + 40}" height="{height}" font-family="monospace" font-size="11">']
    for n in nodes:  # edges first, drawn as arcs on the left of the boxes
        for a in n.all_input_nodes:
            src = a
            while src not in index and src.all_input_nodes and _op_name(src).split(".")[0] in _HIDDEN | {"getitem"}:
                src = src.all_input_nodes[0]
            if src in index:
                y1, y2 = 20 + index[src] * row + 10, 20 + index[n] * row + 10
                bend = x0 - 10 - min(240, (y2 - y1) / 6)
                parts.append(f'<path d="M{x0},{y1} C{bend},{y1} {bend},{y2} {x0},{y2}" fill="none" stroke="#999"/>')
    for n in nodes:
        y = 20 + index[n] * row
        fqn = fqn_of(n)
        label = f"{_op_name(n).replace('aten::', '').replace('zq::', 'zq.')} {_shape(n)}"
        parts.append(f'<rect x="{x0}" y="{y}" width="{w}" height="{row - 6}" rx="4" fill="{COLOURS[category(n)]}" stroke="#555">'
                     f'<title>{html.escape(n.format_node())}</title></rect>')
        parts.append(f'<text x="{x0 + 6}" y="{y + 14}">{html.escape(label[:70])}</text>')
        if fqn:
            parts.append(f'<text x="{x0 + w + 6}" y="{y + 14}" fill="#333">{html.escape(fqn)}</text>')
    parts.append("</svg>")
    legend = " ".join(f'<span style="background:{c};padding:2px 6px;margin:2px">{k}</span>' for k, c in COLOURS.items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
            f"<h2>{html.escape(title)}</h2><p>{legend}</p>{''.join(parts)}</body></html>")


def fusion_table(record) -> str:
    lines = ["# Fusions", "", "| kind | module | replaced | fused op | note |", "|---|---|---|---|---|"]
    lines += [f"| {f['kind']} | {f['fqn']} | {' + '.join(f['replaced'])} | {f['fused_op']} | {f['note']} |"
              for f in record.fusions]
    lines += ["", "# Not fused", "", "| candidate | module | why |", "|---|---|---|"]
    lines += [f"| {n['candidate']} | {n['fqn']} | {n['reason']} |" for n in record.not_fused]
    return "\n".join(lines) + "\n"


def dump_files(engine) -> dict[str, str]:
    """Every file of the dump, in memory: {file name: text}."""
    if not engine.snapshots:
        raise ValueError("this engine has no pass snapshots (engines loaded from a file keep only the report); "
                         "compile again with dump_dir= to get the per-pass graphs")
    files = {}
    for name, text, page in engine.snapshots:
        files[f"{name}.txt"] = text
        files[f"{name}.html"] = page
    files["fusions.md"] = fusion_table(engine.record)
    files["report.txt"] = engine.report() + "\n"
    files["plan.json"] = json.dumps(engine.record.gemms, indent=1)
    return files


def _earlier_dump(out_dir: str) -> list[str] | None:
    """The files an earlier dump in `out_dir` wrote (from its manifest), None when there is no manifest."""
    try:
        with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        return [str(n) for n in manifest["files"]] if manifest.get("format") == "zqcompile-dump" else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_dump_dir(out_dir: str | os.PathLike) -> str:
    """Before any work: the absolute dump folder, or OutputPathError when writing there would touch files
    zqcompile did not write."""
    user = os.fspath(out_dir)
    full = os.path.abspath(user)
    if os.path.lexists(full) and (os.path.islink(full) or not os.path.isdir(full)):
        raise OutputPathError(f"cannot dump to {user!r}: it is a file, not a folder")
    if os.path.isdir(full):
        entries = [e for e in os.listdir(full) if not e.startswith(TMP_PREFIX)]
        if entries and _earlier_dump(full) is None:
            raise OutputPathError(f"cannot dump to {user!r}: the folder is not empty and holds no earlier "
                                  f"zqcompile dump ({MANIFEST}); give a new or empty folder")
    parent = os.path.dirname(full)
    if not os.path.isdir(parent):
        raise OutputPathError(f"cannot dump to {user!r}: folder {parent!r} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.isdir(full) and not os.access(full, os.W_OK)):
        raise OutputPathError(f"cannot dump to {user!r}: not writable")
    return full


@dataclass
class StagedDump:
    """A dump written to a temporary folder beside its target, put in place by commit()."""

    tmp: str
    target: str
    user_path: str
    names: list[str]

    def commit(self) -> None:
        if not os.path.exists(self.target):
            os.rename(self.tmp, self.target)  # a new folder: one atomic rename
            return
        old = _earlier_dump(self.target) or []
        for name in self.names:  # an empty folder or an earlier dump: replace file by file, manifest last
            os.replace(os.path.join(self.tmp, name), os.path.join(self.target, name))
        for name in set(old) - set(self.names):
            path = os.path.join(self.target, name)
            if os.path.isfile(path) and os.path.dirname(os.path.abspath(path)) == self.target:
                os.unlink(path)
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def stage_dump(engine, out_dir: str | os.PathLike) -> StagedDump:
    """Check the target, then write the whole dump into a temporary folder next to it."""
    target = check_dump_dir(out_dir)
    files = dump_files(engine)
    names = sorted(files) + [MANIFEST]
    files[MANIFEST] = json.dumps({"format": "zqcompile-dump", "version": 1, "model": engine.record.model,
                                  "config": engine.record.config, "files": names}, indent=1)
    try:
        tmp = tempfile.mkdtemp(prefix=TMP_PREFIX + "dump-", dir=os.path.dirname(target))
    except OSError as e:
        raise OutputPathError(f"cannot dump to {os.fspath(out_dir)!r}: {e.strerror}") from None
    staged = StagedDump(tmp, target, os.fspath(out_dir), names)
    try:
        for fname in names:  # the manifest last: its presence says the dump is complete
            with open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
                f.write(files[fname])
    except BaseException as e:
        staged.discard()
        if isinstance(e, OSError):
            raise OutputPathError(f"cannot dump to {os.fspath(out_dir)!r}: {e.strerror or e} (nothing written)") from None
        raise
    return staged


def write_dump(engine, out_dir: str | os.PathLike) -> list[str]:
    """Write the dump into `out_dir` (new, empty, or an earlier dump); returns the paths written."""
    staged = stage_dump(engine, out_dir)
    try:
        staged.commit()
    except OSError as e:
        raise OutputPathError(f"cannot dump to {os.fspath(out_dir)!r}: {e.strerror or e}") from None
    finally:
        staged.discard()
    return [os.path.join(staged.target, n) for n in staged.names]
