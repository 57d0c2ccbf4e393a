"""FP8 GEMM benchmark (issue 14): the Hopper FP8 kernel with the fused epilogue (sm90_fp8: each tile configuration
and the library's pick) against the FP8 GEMM zqcompile runs today (torch._scaled_mm with row-wise scales, then the
epilogue in PyTorch; also timed alone), the INT8 Hopper kernel (the same template and epilogue on INT8 codes) and
cuBLAS FP16 (torch.matmul, no epilogue), on LLM shapes (M, N, K). Kernel time only: each measurement is a CUDA graph
of the GEMM over distinct weight copies (enough FP8 weight bytes to defeat the L2 where the weight dominates),
timed with CUDA events, the median of 20 replays (bench_gemm.time_graph). The epilogue is a bf16 bias, no
activation, bf16 out (scaled_mm's row-wise output type). TOP/s = 2 M N K / time, and the fraction of the H200's
dense FP8 peak (1979 TOP/s). Prints a markdown table and writes fp8_gemm_<device>.json / .md into --out.

    python bench/bench_fp8_gemm.py [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import zqcompile  # noqa: E402,F401
from bench.bench_gemm import L2_DEFEAT_BYTES, run_meta, time_graph  # noqa: E402
from zqcompile import plugins  # noqa: E402
from zqcompile.ops import quant_math as qm  # noqa: E402

SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (64, 28672, 4096), (4096, 4096, 4096), (8192, 8192, 8192),
          (16384, 3072, 768)]  # (M, N, K)
FP8_PEAK_TOPS = 1979.0  # H200 / H100 SXM, dense FP8 tensor-core peak
REPLAYS = 20


def copies_for(m: int, n: int, k: int) -> int:
    """Distinct weight copies per graph: FP8 weight bytes past the L2 (2 when x dominates)."""
    return max(1, min(32, -(-L2_DEFEAT_BYTES // (n * k)))) if m * k < 64 * n * k else 2


def bench_shape(m: int, n: int, k: int, cuda_gemm, fp8_configs: int) -> dict:
    dev, bf16 = "cuda", torch.bfloat16
    copies = copies_for(m, n, k)
    xf = torch.randn(m, k, device=dev)
    wfs = [torch.randn(n, k, device=dev) * k ** -0.5 for _ in range(copies)]
    xq, xs = qm.quantize_per_token_fp8(xf)
    xs = xs.reshape(m).contiguous()
    w8 = [qm.quantize_weight_fp8(w) for w in wfs]
    xi, xis = qm.quantize_per_token(xf)
    xis = xis.reshape(m).contiguous()
    wi = [qm.quantize_weight(w, 8) for w in wfs]
    x16, w16 = xf.half(), [w.half() for w in wfs]
    bias = torch.randn(n, device=dev, dtype=bf16) * 0.1
    outs = [torch.empty(m, n, device=dev, dtype=bf16) for _ in range(copies)]
    outs16 = [torch.empty(m, n, device=dev, dtype=torch.float16) for _ in range(copies)]
    del wfs

    def t(fn) -> float:  # µs
        return time_graph(fn, copies, reps=REPLAYS) * 1e3

    def fp8(i, cfg=-1):
        cuda_gemm.run_gemm("sm90_fp8", xq, xs, w8[i][0], w8[i][1], bias, None, "none", 8, outs[i], config=cfg)

    row = {"m": m, "n": n, "k": k, "copies": copies,
           "fp16_us": t(lambda i: torch.matmul(x16, w16[i].t(), out=outs16[i])),
           "scaled_mm_epilogue_us": t(lambda i: cuda_gemm._scaled_mm(xq, xs, w8[i][0], w8[i][1], bias, None, "none",
                                                                     bf16)),
           "scaled_mm_us": t(lambda i: torch._scaled_mm(xq, w8[i][0].t(), scale_a=xs.reshape(m, 1),
                                                        scale_b=w8[i][1].reshape(1, n), out_dtype=bf16,
                                                        use_fast_accum=False)),
           "int8_sm90_us": t(lambda i: cuda_gemm.run_gemm("sm90", xi, xis, wi[i][0], wi[i][1], bias, None, "none", 8,
                                                          outs[i])),
           "sm90_fp8_us": t(fp8)}
    for c in range(fp8_configs):
        row[f"sm90_fp8_cfg{c}_us"] = t(lambda i, c=c: fp8(i, c))
    best = min(row[f"sm90_fp8_cfg{c}_us"] for c in range(fp8_configs))
    ops = 2.0 * m * n * k
    row.update(sm90_fp8_best_us=best, sm90_fp8_tops=ops / row["sm90_fp8_us"] / 1e6,
               sm90_fp8_best_tops=ops / best / 1e6, scaled_mm_epilogue_tops=ops / row["scaled_mm_epilogue_us"] / 1e6)
    row["sm90_fp8_peak_fraction"] = row["sm90_fp8_best_tops"] / FP8_PEAK_TOPS
    row["speedup_vs_scaled_mm"] = row["scaled_mm_epilogue_us"] / row["sm90_fp8_us"]
    return row


def markdown(meta: dict, rows: list[dict], fp8_configs: int) -> str:
    cfgs = [f"cfg{c} µs" for c in range(fp8_configs)]
    lines = [f"# FP8 GEMM: sm90_fp8 (fused epilogue) vs torch._scaled_mm + PyTorch epilogue — {meta['device']}", "",
             f"`{meta['command']}`", "", f"torch {meta['torch']}, CUDA {meta['cuda']}; {meta['method']}", "",
             "| M | N | K | fp16 µs | scaled_mm+epi µs | scaled_mm µs | INT8 sm90 µs | sm90_fp8 µs | "
             + " | ".join(cfgs) + " | sm90_fp8 TOP/s (pick / best) | best % of FP8 peak | vs scaled_mm+epi |",
             "|---" * (11 + fp8_configs) + "|"]
    for r in rows:
        c = " | ".join(f"{r[f'sm90_fp8_cfg{i}_us']:.1f}" for i in range(fp8_configs))
        lines.append(f"| {r['m']} | {r['n']} | {r['k']} | {r['fp16_us']:.1f} | {r['scaled_mm_epilogue_us']:.1f} | "
                     f"{r['scaled_mm_us']:.1f} | {r['int8_sm90_us']:.1f} | {r['sm90_fp8_us']:.1f} | {c} | "
                     f"{r['sm90_fp8_tops']:.0f} / {r['sm90_fp8_best_tops']:.0f} | "
                     f"{100 * r['sm90_fp8_peak_fraction']:.1f} | {r['speedup_vs_scaled_mm']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--quick", action="store_true", help="the first and the 4096^3 shape only")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not plugins.load():
        sys.exit(f"needs a CUDA GPU and the kernel library: {plugins.status()}")
    from zqcompile.plugins import cuda as lib
    from zqcompile.plugins import cuda_gemm
    if not cuda_gemm.sm90_usable():
        sys.exit("needs an sm_90 GPU and the kernel library built with the Hopper GEMMs")
    fp8_configs = lib._lib.zq_gemm_sm90_fp8_num_configs()
    shapes = [SHAPES[0], SHAPES[3]] if args.quick else SHAPES
    t0, rows = time.time(), []
    for m, n, k in shapes:
        r = bench_shape(m, n, k, cuda_gemm, fp8_configs)
        rows.append(r)
        print(f"M={m:6d} N={n:6d} K={k:5d}  scaled_mm+epi {r['scaled_mm_epilogue_us']:8.1f} us  sm90_fp8 "
              f"{r['sm90_fp8_us']:8.1f} us (best {r['sm90_fp8_best_us']:.1f}, {r['sm90_fp8_best_tops']:.0f} TOP/s)  "
              f"INT8 sm90 {r['int8_sm90_us']:8.1f} us  fp16 {r['fp16_us']:8.1f} us", flush=True)
    meta = run_meta(f"CUDA graph over distinct weight copies (L2 defeated where the weight dominates), CUDA events, "
                    f"median of {REPLAYS} replays; epilogue: bf16 bias, no activation, bf16 out (fp16 for cuBLAS "
                    f"FP16, no epilogue); sm90_fp8 = the library's pick (zq_gemm_run), cfgN = forced", t0,
                    fp8_peak_tops=FP8_PEAK_TOPS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = meta["device"].replace(" ", "_")
    (out / f"fp8_gemm_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = markdown(meta, rows, fp8_configs)
    (out / f"fp8_gemm_{tag}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
