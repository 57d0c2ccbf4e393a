"""Fused producer kernels (norm_quant, act_quant, quantize_per_token) of libzq_kernels.so: time and achieved
bandwidth (bytes read + written once) vs the same op's reference implementation on the GPU (unfused torch
ops). CUDA-graph replays, medians. Prints a markdown table, writes JSON.

    python bench/bench_elementwise.py [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_gemm import time_graph  # noqa: E402

import zqcompile  # noqa: E402,F401
from zqcompile import plugins  # noqa: E402
from zqcompile.ops import registry  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available() or not plugins.load():
        sys.exit(f"needs a CUDA GPU and the kernel library: {plugins.status()}")
    dev, dt = "cuda", torch.float16
    rows = []
    for m, k in [(16384, 768), (16384, 1024), (8192, 4096), (128, 768)]:
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
        for name, (call, op, nbytes) in cases.items():
            ours = time_graph(lambda i: call(getattr(torch.ops.zq, op)), 1)
            ref = time_graph(lambda i: call(registry.op(op).reference), 1)
            rows.append({"op": name, "m": m, "k": k, "ours_us": ours * 1e3, "ref_us": ref * 1e3,
                         "ours_gbs": nbytes / ours / 1e6, "speedup": ref / ours})
    props = torch.cuda.get_device_properties(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = props.name.replace(" ", "_")
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
