"""Graph dumps: after every pass, the graph as readable text and as a self-contained HTML page with an SVG
picture (quantized ops, fused ops and FP GEMMs coloured differently, labelled with module FQNs), plus the
fusion table and the report. `write_dump` builds everything in memory, then writes it into a fresh temporary
folder that replaces the target at the end, so a failed dump leaves nothing half-written."""
from __future__ import annotations

import html
import json
import os
import shutil
import tempfile

import torch
from torch import fx

from .capture import fqn_of

COLOURS = {"fused": "#7fd17f", "quant": "#8fb8ff", "fp_gemm": "#ffb36b", "qdq": "#ff8080", "other": "#e8e8e8"}
_FUSED = {"norm_quant", "act_quant", "int8_gemm_dequant", "weight_only_gemm"}
_QUANT = {"quantize_per_token", "quantize_per_tensor"}
_QDQ = {"dequantize_per_token", "dequantize_weight"}
_HIDDEN = {"getitem", "sym_size", "_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"}


def _op_name(n: fx.Node) -> str:
    if n.op != "call_function":
        return n.op if n.op != "get_attr" else f"get_attr {n.target}"
    t = n.target
    if hasattr(t, "name") and callable(t.name):
        return t.name()
    return getattr(t, "__name__", str(t))


def category(n: fx.Node) -> str:
    name = _op_name(n).split("::")[-1].split(".")[0]
    if name in _FUSED:
        return "fused"
    if name in _QUANT:
        return "quant"
    if name in _QDQ:
        return "qdq"
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


def write_dump(engine, out_dir: str) -> list[str]:
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
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OSError(f"cannot dump to {out_dir!r}: it is a file")
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".zq-dump-", dir=parent)
    except OSError as e:
        raise OSError(f"cannot dump to {out_dir!r}: {e.strerror}") from None
    try:
        for fname, content in files.items():
            with open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
                f.write(content)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(os.path.join(out_dir, f) for f in files)
