"""engine.report(): plain-text tables of what the compiler did (passes, GEMMs by precision, the GEMM kernel per M
bucket, fusions and the candidates not fused, with reasons) and what ran slower than planned in this process.
The CLI prints the same text."""
from __future__ import annotations

from collections import Counter


def _table(headers: list[str], rows: list[list]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def memory_lines(rec) -> list[str]:
    """What compiling took and what the engine holds (bytes counted once per shared tensor)."""
    m = getattr(rec, "memory", None) or {}
    out = []
    if "engine_bytes" in m:
        out.append(f"engine holds {_mib(m['engine_bytes'])} (every constant of every graph once, KV cache included)")
    if "host_peak_bytes" in m:
        scope = "during compile" if m.get("host_peak_scope") == "compile" else "of the process so far"
        out.append(f"compile peak host memory {_mib(m['host_peak_bytes'])} (resident set, peak {scope})")
    if "gpu_peak_above_start_bytes" in m:
        out.append(f"compile peak GPU memory {_mib(m['gpu_peak_above_start_bytes'])} above what was allocated "
                   f"before (the model)")
    if "stream_blocks" in m:
        out.append(f"streamed from the folder block by block ({m['stream_blocks']} transformer blocks, then the "
                   f"rest): at most {_mib(m['stream_peak_transient_bytes'])} of float weights loaded or derived at "
                   f"once beside the engine; the largest block holds {_mib(m['stream_largest_block_bytes'])}")
    return out


def format_report(rec) -> str:
    out = [f"zqcompile engine: {rec.model}, config {rec.config}", ""]
    if getattr(rec, "tensor_parallel", ""):
        out += [f"Tensor parallel: this engine is {rec.tensor_parallel}: its shard of the attention heads, KV cache "
                f"and MLP; an all-reduce after o_proj and down_proj", ""]
    if getattr(rec, "generation", ""):
        out += [f"Generation: {rec.generation}", ""]
    if memory_lines(rec):
        out += ["Memory", *memory_lines(rec), ""]
    out += ["Passes", _table(["pass", "matched", "rewritten", "ms", "notes"],
                             [[p["name"], p["matched"], p["rewritten"], f"{p['seconds'] * 1e3:.1f}",
                               "; ".join(p["notes"])] for p in rec.passes]), ""]
    by_kernel = Counter((g["scheme"], g["kernel"]) for g in rec.gemms)
    out += ["GEMMs by precision", _table(["scheme", "runs as", "count"],
                                         [[s, k, c] for (s, k), c in sorted(by_kernel.items())]), ""]
    out += ["GEMM plan", _table(["module", "role", "N x K", "scheme", "decided by", "runs as"],
                                [[g["fqn"], g["role"], "x".join(map(str, g["shape"])), g["scheme"], g["rule"],
                                  g["kernel"]] for g in rec.gemms]), ""]
    out += kernel_lines(rec)
    kinds = Counter(f["kind"] for f in rec.fusions)
    out += ["Fusions (" + ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())) + ")",
            _table(["kind", "module", "replaced", "fused op", "note"],
                   [[f["kind"], f["fqn"], " + ".join(f["replaced"]), f["fused_op"], f["note"]] for f in rec.fusions]),
            ""]
    out += ["Not fused", _table(["candidate", "module", "why"],
                                [[n["candidate"], n["fqn"], n["reason"]] for n in rec.not_fused])
            if rec.not_fused else "(none)"]
    out += fallback_lines()
    return "\n".join(out)


def kernel_lines(rec) -> list[str]:
    """The kernel plan (plugins/gemm_plan.py): one row per quantized GEMM, one column per M bucket; a cell shows
    where TensorRT's plugin runs another kernel (the fp16 dequant path is PyTorch-only)."""
    planned = [g for g in rec.gemms if "kernels" in g]
    if not planned:
        return ["Kernels per M bucket", "(not planned: an engine saved before kernel plans, or no quantized GEMM)", ""]
    first = planned[0]["kernels"]
    buckets = list(first["buckets"])
    head = f"Kernels per M bucket (M = tokens per call), planned for {first['planned_for']}"
    cells = {c for g in planned for c in g["kernels"]["buckets"].values()}
    if len(cells) == 1 and next(iter(cells)).startswith("reference ("):
        return [head, f"every quantized GEMM: {next(iter(cells))}; planned again when the engine runs on or moves "
                f"to a CUDA device", ""]

    def cell(g, b):
        k = g["kernels"]
        trt = k.get("tensorrt", {}).get(b)
        return k["buckets"][b] + (f" [TRT: {trt}]" if trt and trt != k["buckets"][b] else "")

    rows = [[g["fqn"], "x".join(map(str, g["shape"])), g["scheme"], *(cell(g, b) for b in buckets)] for g in planned]
    fallbacks = sorted({f"{k} -> {f}" for g in planned for b, f in g["kernels"]["fallbacks"].items()
                        for k in [g["kernels"]["buckets"][b]]})
    return [head, _table(["module", "N x K", "scheme", *buckets], rows),
            "if a kernel declines at run time (pointer alignment, grid size): " + (", ".join(fallbacks) or "none"), ""]


def fallback_lines() -> list[str]:
    """Calls of this process that took a slower path than the planned kernel (zqcompile.plugins.cuda.fallbacks)."""
    from zqcompile.plugins import kernel_fallbacks
    counts = kernel_fallbacks()
    if not counts:
        return []
    return ["", "Run-time fallbacks (this process)",
            _table(["op", "why", "calls"], [[op, why, n] for (op, why), n in sorted(counts.items())])]
