"""Fused producer kernels (norm_quant, act_quant, quantize_per_token) of libzq_kernels.so: time and achieved
bandwidth (bytes read + written once) vs the same op's reference implementation on the GPU (unfused torch
ops). CUDA-graph replays, medians. Prints a markdown table, writes JSON.

    python bench/bench_elementwise.py [--out bench/results]
    python bench/bench_elementwise.py --decode   # decode rows (M = 1-64): split rows vs one block a row
    python bench/bench_elementwise.py --fp8      # the FP8 E4M3-emitting kernels (zq_*_fp8) beside the INT8 ones

--decode times the kernels at decode sizes (Llama-3-8B's K = 4096 / 14336), the split-row layout (a row over a
cluster of 8 blocks, the library's choice) against one block a row (`cuda.set_row_split(0)`), 20 calls a graph.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_gemm import time_graph  # noqa: E402

import zqcompile  # noqa: E402,F401
from zqcompile import plugins  # noqa: E402
from zqcompile.ops import registry  # noqa: E402


def decode_cases(m: int, k: int, dev: str, dt) -> dict:
    x, r = torch.randn(m, k, device=dev, dtype=dt), torch.randn(m, k, device=dev, dtype=dt)
    g, w = 0.1 * torch.randn(m, k, device=dev, dtype=dt), torch.ones(k, device=dev, dtype=dt)
    return {"act_quant(silu gate)": (lambda f: f(x, None, g, "silu", False), "act_quant", 2 * m * k * 2 + m * k),
            "norm_quant(rms,+res,sum)": (lambda f: f(x, r, w, None, 1e-6, "rms", False, True), "norm_quant",
                                         3 * m * k * 2 + m * k),
            "quantize_per_token": (lambda f: f(x), "quantize_per_token", m * k * 2 + m * k)}


def decode_rows(dev: str, dt, swap=None) -> list[dict]:
    from zqcompile.plugins import cuda
    rows = []
    for m in (1, 4, 16, 33, 64):
        for k in (2048, 8192) if swap else (4096, 14336):
            if swap:  # the 1B shape's rows (hidden 2048, MLP 8192), each build at the library's row layout
                ab_rows(rows, decode_cases(m, k, dev, dt), m, k, swap, copies=20)
                continue
            for name, (call, op, nbytes) in decode_cases(m, k, dev, dt).items():
                fn, t = getattr(torch.ops.zq, op), {}
                for label, split in (("split", -1), ("block", 0)):
                    cuda.set_row_split(split)
                    t[label] = time_graph(lambda i: call(fn), 20)
                cuda.set_row_split(-1)
                rows.append({"op": name, "m": m, "k": k, "split_us": t["split"] * 1e3, "block_us": t["block"] * 1e3,
                             "split_gbs": nbytes / t["split"] / 1e6, "speedup": t["block"] / t["split"]})
    return rows


ROW_FUNCS = ("zq_error_string", "zq_set_row_split", "zq_set_pdl", "zq_quantize_per_token", "zq_quantize_per_token_fp8",
             "zq_norm_quant", "zq_norm_quant_fp8", "zq_act_quant", "zq_act_quant_fp8")


def other_lib(path: str):
    """The row kernels of another build (e.g. the previous commit's act_quant / norm_quant / quantize / launch
    sources alone, same ABI), swapped in for this one's with `with other_lib(p)():`."""
    import ctypes
    from unittest import mock
    from zqcompile.plugins import cuda
    lib = ctypes.CDLL(path)
    cuda._bind(lib, ROW_FUNCS)
    return lambda: mock.patch.object(cuda, "_lib", lib)


def ab_rows(rows: list[dict], cases: dict, m: int, k: int, swap, copies: int = 1) -> None:
    """Each case timed with the other build's kernels and this one's, interleaved (old, new, old, new), the
    medians' ratio, and whether both builds' outputs are equal bit for bit."""
    for name, (call, op, nbytes) in cases.items():
        fn = getattr(torch.ops.zq, op)
        builds = {"old": swap, "new": contextlib.nullcontext}
        t = {"old": [], "new": []}
        for _ in range(2):
            for label, build in builds.items():
                with build():
                    t[label].append(time_graph(lambda i: call(fn), copies))
        outs = {}
        for label, build in builds.items():
            with build():
                outs[label] = [o.view(torch.uint8) if o.element_size() == 1 else o for o in call(fn)]
        same = all(torch.equal(a, b) for a, b in zip(outs["old"], outs["new"]))
        o, n = min(t["old"]), min(t["new"])
        rows.append({"op": name, "m": m, "k": k, "old_us": o * 1e3, "new_us": n * 1e3, "old_gbs": nbytes / o / 1e6,
                     "new_gbs": nbytes / n / 1e6, "speedup": o / n, "bit_equal": same})


def write_ab(ab: list[dict], out: Path, tag: str, other: str, device: str) -> None:
    meta = {"device": device, "torch": torch.__version__, "command": " ".join([sys.executable] + sys.argv)}
    (out / f"elementwise_ab_{tag}.json").write_text(json.dumps({"meta": meta, "rows": ab}, indent=1))
    lines = [f"# Fused producers, this build vs {other}, fp16 in — {device}", "",
             "Same process, interleaved old/new/old/new, best of two CUDA-graph medians each (decode rows: 20 calls a "
             "graph, µs a call); bytes read + written once; bit-equal: every output (codes, scales, out / sum) of the "
             "two builds equal", "",
             "| op | M | K | old µs | new µs | old GB/s | new GB/s | old / new | bit-equal |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['m']} | {r['k']} | {r['old_us']:.1f} | {r['new_us']:.1f} | {r['old_gbs']:.0f} | "
              f"{r['new_gbs']:.0f} | {r['speedup']:.2f} | {r['bit_equal']} |" for r in ab]
    (out / f"elementwise_ab_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--decode", action="store_true", help="decode sizes: split rows vs one block a row")
    ap.add_argument("--fp8", action="store_true", help="also the FP8-emitting kernels (rows op_fp8), same sizes")
    ap.add_argument("--ab-lib", metavar="SO", help="A/B against the row kernels of another build (same ABI), "
                    "interleaved in this process, outputs compared bit for bit")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not plugins.load():
        sys.exit(f"needs a CUDA GPU and the kernel library: {plugins.status()}")
    dev, dt = "cuda", torch.float16
    props = torch.cuda.get_device_properties(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = props.name.replace(" ", "_")
    swap = other_lib(args.ab_lib) if args.ab_lib else None
    if args.decode and swap:
        return write_ab(decode_rows(dev, dt, swap), out, f"decode_{tag}", args.ab_lib, props.name)
    if args.decode:
        rows = decode_rows(dev, dt)
        meta = {"device": props.name, "torch": torch.__version__, "command": " ".join([sys.executable] + sys.argv)}
        (out / f"elementwise_decode_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        lines = [f"# Fused quantization producers at decode sizes, fp16 in — {props.name}", "",
                 "µs a call (20 calls a CUDA graph, median of 15 replays); split: a row over a cluster of 8 blocks "
                 "(the library's choice); block: one block a row", "",
                 "| op | M | K | split µs | block µs | split GB/s | block / split |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['op']} | {r['m']} | {r['k']} | {r['split_us']:.2f} | {r['block_us']:.2f} | "
                  f"{r['split_gbs']:.0f} | {r['speedup']:.2f} |" for r in rows]
        (out / f"elementwise_decode_{tag}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    rows, ab = [], []
    # BERT-base / -large rows at batch 128 (K = 768 / 1024; their FC1 outputs 3072 / 4096), Llama-3-8B prefill rows
    for m, k in [(16384, 768), (16384, 1024), (16384, 3072), (16384, 4096), (8192, 4096), (128, 768)]:
        x = torch.randn(m, k, device=dev, dtype=dt)
        r = torch.randn(m, k, device=dev, dtype=dt)
        w = torch.ones(k, device=dev, dtype=dt)
        b = torch.zeros(k, device=dev, dtype=dt)
        cases = {
            "norm_quant(layer,+res,sum)": (lambda f: f(x, r, w, b, 1e-5, "layer", False, True), "norm_quant",
                                           2 * m * k * 2 + m * k * 2 + m * k),
            "act_quant(bias+gelu)": (lambda f: f(x, b, None, "gelu", False), "act_quant", m * k * 2 + m * k),
            "quantize_per_token": (lambda f: f(x), "quantize_per_token", m * k * 2 + m * k),
        }
        if m > 128:  # the prefill shapes of the gated MLPs (Llama) and a RMSNorm, beside BERT's
            g = 0.1 * torch.randn(m, k, device=dev, dtype=dt)
            cases.update({
                "act_quant(silu gate)": (lambda f: f(x, None, g, "silu", False), "act_quant", 2 * m * k * 2 + m * k),
                "norm_quant(rms,+res,sum)": (lambda f: f(x, r, w, None, 1e-6, "rms", False, True), "norm_quant",
                                             2 * m * k * 2 + m * k * 2 + m * k)})
        if args.fp8:  # the same calls and bytes (one-byte codes either way) on the FP8 E4M3 ops
            cases.update({f"{name} fp8": (call, f"{op}_fp8", nbytes) for name, (call, op, nbytes) in cases.items()})
        if swap is not None:
            ab_rows(ab, cases, m, k, swap)
            continue
        for name, (call, op, nbytes) in cases.items():
            ours = time_graph(lambda i: call(getattr(torch.ops.zq, op)), 1)
            ref = time_graph(lambda i: call(registry.op(op).reference), 1)
            rows.append({"op": name, "m": m, "k": k, "ours_us": ours * 1e3, "ref_us": ref * 1e3,
                         "ours_gbs": nbytes / ours / 1e6, "speedup": ref / ours})
    if swap is not None:
        return write_ab(ab, out, tag, args.ab_lib, props.name)
    tag = f"fp8_{tag}" if args.fp8 else tag
    (out / f"elementwise_{tag}.json").write_text(json.dumps(
        {"meta": {"device": props.name, "torch": torch.__version__, "command": " ".join([sys.executable] + sys.argv)},
         "rows": rows}, indent=1))
    lines = [f"# Fused quantization producers, fp16 in — {props.name}", "",
             "| op | M | K | ours µs | unfused torch µs | ours GB/s | speedup |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['m']} | {r['k']} | {r['ours_us']:.1f} | {r['ref_us']:.1f} | {r['ours_gbs']:.0f} | "
              f"{r['speedup']:.1f} |" for r in rows]
    (out / f"elementwise_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
