"""GEMM-level benchmark: zqcompile's INT8 GEMM with the fused dequant epilogue (libzq_kernels.so) vs cuBLAS
FP16 (`torch.matmul`) on the BERT/GPT shapes, K, N in {768, 1024, 3072, 4096}, M from 1 to 16384, plus
8192^3. Kernel time only: each measurement is a CUDA graph replaying the GEMM over enough distinct weight
copies to defeat the L2 cache; medians over repeats via CUDA events. Prints a markdown table and writes
JSON (device, versions, command line) next to it.

W8A8 (row scales): the CUDA-core kernel, the sm90 kernel (each tile configuration) and the mma kernel.
W4A8 with K-group scales (group 128): the mma kernel against the path it replaces (weight dequantized to fp16
per call, then cuBLAS) and, for M <= 256, the CUDA-core kernel. --mma-configs times every mma tile
configuration too.

    python bench/bench_gemm.py [--quick] [--mma-configs] [--out bench/results]
    python bench/bench_gemm.py --w4-crossover   # W4A8 K groups: mma vs fp16 dequant, M = 256-8192, model shapes

--w4-crossover: where the mma kernel stops beating the fp16-dequant path for INT4 K groups (gemm_kernels
MMA_KGROUP_MAX_M), on the BERT, Llama-3.2-1B and Llama-3-8B MLP shapes; writes gemm_w4_crossover_<device>.*.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import zqcompile  # noqa: E402,F401
from zqcompile import plugins  # noqa: E402
from zqcompile.ops import quant_math as qm  # noqa: E402
from zqcompile.plugins.gemm_kernels import SMALL_M  # noqa: E402

KN = [768, 1024, 3072, 4096]
MS = [1, 4, 16, 64, 256, 1024, 4096, 8192, 16384]
L2_DEFEAT_BYTES = 160 << 20


def time_graph(fn_per_copy, copies: int, reps: int = 15) -> float:
    """Median ms of one call: capture `copies` calls (each on its own operands) in a CUDA graph, replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(copies):  # warm-up (and lazy init) outside the capture
            fn_per_copy(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(copies):
            fn_per_copy(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / copies)
    return statistics.median(times)


def bench_w4a8_kgroups(m: int, k: int, n: int, copies: int, cuda_mod, mma_configs: list[int]) -> dict:
    """W4A8 with group-128 K scales: the mma kernel (auto and each of mma_configs), the per-call fp16 dequant +
    cuBLAS path it replaces, and the CUDA-core kernel for small M."""
    dev, group = "cuda", 128
    xq, xs = qm.quantize_per_token(torch.randn(m, k, device=dev, dtype=torch.float16))
    xs = xs.reshape(m).contiguous()
    wqs = [qm.quantize_weight(torch.randn(n, k, device=dev) * 0.05, 4, "k_groups", group_size=group)
           for _ in range(copies)]
    outs = [torch.empty(m, n, device=dev, dtype=torch.float16) for _ in range(copies)]

    def mma(cfg: int):
        return lambda i: cuda_mod.run_gemm("mma", xq, xs, wqs[i][0], wqs[i][1], None, None, "none", 4, outs[i],
                                           config=cfg)

    def fp16_dequant(i: int):  # as int8_gemm_dequant's former "kgroup_fp16" path, less its fp32 epilogue
        w16 = cuda_mod.dequantize_weight(wqs[i][0], wqs[i][1], 4, torch.float16)
        torch.matmul((xq.float() * xs[:, None]).half(), w16.t(), out=outs[i])

    row = {"w4g128_mma_ms": time_graph(mma(-1), copies), "w4g128_fp16_dequant_ms": time_graph(fp16_dequant, copies)}
    for c in mma_configs:
        row[f"w4g128_mma_cfg{c}_ms"] = time_graph(mma(c), copies)
    row["w4g128_simt_ms"] = time_graph(
        lambda i: cuda_mod.run_gemm("simt", xq, xs, wqs[i][0], wqs[i][1], None, None, "none", 4, outs[i]),
        copies) if m <= 256 else None
    return row


W4_SHAPES = [(768, 3072), (3072, 768), (1024, 4096), (4096, 1024), (2048, 8192), (8192, 2048), (4096, 14336),
             (14336, 4096)]  # (K, N): BERT-base/large fc1/fc2, Llama-3.2-1B and Llama-3-8B up/down


def w4_crossover(cuda_mod, out: Path, tag: str) -> None:
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "command": " ".join([sys.executable] + sys.argv), "method": "CUDA graphs, median of 15 replays; fp16: "
            "torch.matmul on one weight (L2 may hold it), W4A8: distinct weight copies (L2 defeated)"}
    rows = []
    for m in (256, 1024, 2048, 512, 4096, 8192):  # the likely crossovers first (written after every row)
        for k, n in W4_SHAPES:
            copies = l2_copies(m, k, n)
            x16 = torch.randn(m, k, device="cuda", dtype=torch.float16)
            w16 = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.05
            o = torch.empty(m, n, device="cuda", dtype=torch.float16)
            r = {"m": m, "k": k, "n": n, "fp16_ms": time_graph(lambda i: torch.matmul(x16, w16.t(), out=o), 1)}
            r.update(bench_w4a8_kgroups(m, k, n, copies, cuda_mod, []))
            r["mma_vs_fp16_dequant"] = r["w4g128_fp16_dequant_ms"] / r["w4g128_mma_ms"]
            rows.append(r)
            print(f"K={k:5d} N={n:5d} M={m:5d} fp16 {r['fp16_ms']*1e3:8.1f} us  mma {r['w4g128_mma_ms']*1e3:8.1f} us  "
                  f"fp16-dequant {r['w4g128_fp16_dequant_ms']*1e3:8.1f} us  (dequant / mma {r['mma_vs_fp16_dequant']:.2f})",
                  flush=True)
            (out / f"gemm_w4_crossover_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
            lines = [f"# W4A8 (INT4, K groups of 128): mma kernel vs fp16 dequant + cuBLAS — {meta['device']}", "",
                     f"`{meta['command']}`; {meta['method']}", "",
                     "| K | N | M | fp16 µs | mma µs | fp16-dequant µs | dequant / mma |", "|---|---|---|---|---|---|---|"]
            lines += [f"| {r['k']} | {r['n']} | {r['m']} | {r['fp16_ms']*1e3:.1f} | {r['w4g128_mma_ms']*1e3:.1f} | "
                      f"{r['w4g128_fp16_dequant_ms']*1e3:.1f} | {r['mma_vs_fp16_dequant']:.2f} |"
                      for r in sorted(rows, key=lambda r: (r["k"], r["n"], r["m"]))]
            (out / f"gemm_w4_crossover_{tag}.md").write_text("\n".join(lines) + "\n")


def l2_copies(m: int, k: int, n: int) -> int:
    """Distinct weight copies per graph: enough fp16 weight bytes to defeat L2 (2 when x dominates)."""
    return max(1, min(32, -(-L2_DEFEAT_BYTES // (n * k * 2)))) if m * k < 64 * n * k else 2


def bench_shape(m: int, k: int, n: int, cuda_mod, configs: list[int], mma_configs: list[int]) -> dict:
    dev = "cuda"
    copies = l2_copies(m, k, n)
    x16 = torch.randn(m, k, device=dev, dtype=torch.float16)
    ws16 = [torch.randn(n, k, device=dev, dtype=torch.float16) * 0.05 for _ in range(copies)]
    xq, xs = qm.quantize_per_token(x16)
    xs = xs.reshape(m).contiguous()
    wqs = [qm.quantize_weight(w.float(), 8)[0] for w in ws16]
    wscale = qm.quantize_weight(ws16[0].float(), 8)[1]
    bias = torch.randn(n, device=dev, dtype=torch.float16) * 0.1
    outs = [torch.empty(m, n, device=dev, dtype=torch.float16) for _ in range(copies)]
    t_fp16 = time_graph(lambda i: torch.matmul(x16, ws16[i].t(), out=outs[i]), copies)
    row = {"m": m, "k": k, "n": n, "fp16_ms": t_fp16}
    small = m <= SMALL_M
    row["simt_ms"] = time_graph(
        lambda i: cuda_mod.run_gemm("simt", xq, xs, wqs[i], wscale, bias, None, "none", 8, outs[i]), copies) \
        if m <= 256 else None
    if cuda_mod.sm90_usable(dev):
        for c in configs:
            row[f"sm90_cfg{c}_ms"] = time_graph(
                lambda i: cuda_mod.run_gemm("sm90", xq, xs, wqs[i], wscale, bias, None, "none", 8, outs[i],
                                            config=c), copies)
        row["sm90_auto_ms"] = time_graph(
            lambda i: cuda_mod.run_gemm("sm90", xq, xs, wqs[i], wscale, bias, None, "none", 8, outs[i]), copies)
    row["mma_ms"] = time_graph(
        lambda i: cuda_mod.run_gemm("mma", xq, xs, wqs[i], wscale, bias, None, "none", 8, outs[i]), copies)
    for c in mma_configs:
        row[f"mma_cfg{c}_ms"] = time_graph(
            lambda i, c=c: cuda_mod.run_gemm("mma", xq, xs, wqs[i], wscale, bias, None, "none", 8, outs[i],
                                             config=c), copies)
    # What the op dispatches to (zqcompile.plugins.cuda_gemm, planned by gemm_kernels.choose_gemm): CUDA cores up to SMALL_M, then the
    # sm90 kernel, or the mma kernel where there is none.
    row["ours_ms"] = row["simt_ms"] if small else row.get("sm90_auto_ms", row["mma_ms"])
    flops = 2.0 * m * n * k
    row["fp16_tflops"] = flops / t_fp16 / 1e9
    row["ours_tops"] = flops / row["ours_ms"] / 1e9
    row["speedup"] = t_fp16 / row["ours_ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--mma-configs", action="store_true", help="time every mma tile configuration too")
    ap.add_argument("--w4-crossover", action="store_true", help="W4A8 K groups only: mma vs fp16 dequant")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available() or not plugins.load():
        sys.exit(f"needs a CUDA GPU and the kernel library: {plugins.status()}")
    from zqcompile.plugins import cuda as lib
    from zqcompile.plugins import cuda_gemm as cuda_mod
    if args.w4_crossover:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        return w4_crossover(cuda_mod, out, torch.cuda.get_device_name().replace(" ", "_"))

    configs = list(range(lib._lib.zq_gemm_sm90_num_configs()))
    mma_configs = list(range(lib._lib.zq_gemm_mma_num_configs())) if args.mma_configs else []
    shapes = [(m, k, n) for k in KN for n in KN for m in MS]
    if args.quick:
        shapes = [(m, 4096, 4096) for m in (1, 16, 256, 4096, 16384)]
    shapes.append((8192, 8192, 8192))
    rows = []
    t0 = time.time()
    for m, k, n in shapes:
        r = bench_shape(m, k, n, cuda_mod, configs, mma_configs)
        r.update(bench_w4a8_kgroups(m, k, n, l2_copies(m, k, n), cuda_mod, mma_configs))
        r["w4g128_speedup"] = r["fp16_ms"] / r["w4g128_mma_ms"]
        rows.append(r)
        print(f"M={m:6d} K={k:5d} N={n:5d} fp16 {r['fp16_ms']*1e3:9.1f} us  ours {r['ours_ms']*1e3:9.1f} us "
              f"x{r['speedup']:.2f}  ({r['ours_tops']:.0f} TOP/s)  mma {r['mma_ms']*1e3:9.1f} us  "
              f"W4A8-g128 mma {r['w4g128_mma_ms']*1e3:9.1f} us x{r['w4g128_speedup']:.2f}", flush=True)
    props = torch.cuda.get_device_properties(0)
    meta = {"device": props.name, "sm_count": props.multi_processor_count, "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "library": plugins.status(),
            "command": " ".join([sys.executable] + sys.argv), "seconds": round(time.time() - t0, 1),
            "method": "CUDA graph over distinct weight copies (L2 defeated), median of 15 replays, "
                      "INT8 GEMM incl. per-token x per-row dequant + fp16 bias epilogue; fp16 = torch.matmul; "
                      "W4A8-g128: INT4 weights, group-128 K scales, no bias; fp16-deq = dequantize_weight + "
                      "torch.matmul per call (the path the mma kernel replaces)"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = props.name.replace(" ", "_")
    (out / f"gemm_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# INT8 GEMM (fused dequant) vs cuBLAS FP16 — {props.name}", "", f"`{meta['command']}`", "",
             f"torch {meta['torch']}, CUDA {meta['cuda']}; {meta['method']}", "",
             "| M | K | N | fp16 µs | ours µs | fp16 TFLOP/s | ours TOP/s | speedup | " +
             " | ".join(f"cfg{c} µs" for c in configs) + " | simt µs | mma µs | " +
             "".join(f"mma cfg{c} µs | " for c in mma_configs) +
             "W4A8-g128 mma µs | W4A8-g128 fp16-deq µs | W4A8-g128 simt µs | W4A8-g128 speedup |",
             "|---|---|---|---|---|---|---|---|" + "---|" * (len(configs) + 6 + len(mma_configs))]

    def us(v) -> str:
        return "-" if v is None else f"{v * 1e3:.1f}"

    for r in rows:
        cfgs = " | ".join(us(r.get(f"sm90_cfg{c}_ms")) for c in configs)
        mma_cfgs = "".join(f"{us(r[f'mma_cfg{c}_ms'])} | " for c in mma_configs)
        lines.append(f"| {r['m']} | {r['k']} | {r['n']} | {r['fp16_ms']*1e3:.1f} | {r['ours_ms']*1e3:.1f} | "
                     f"{r['fp16_tflops']:.0f} | {r['ours_tops']:.0f} | {r['speedup']:.2f} | {cfgs} | "
                     f"{us(r['simt_ms'])} | {us(r['mma_ms'])} | {mma_cfgs}{us(r['w4g128_mma_ms'])} | "
                     f"{us(r['w4g128_fp16_dequant_ms'])} | {us(r['w4g128_simt_ms'])} | {r['w4g128_speedup']:.2f} |")
    (out / f"gemm_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
