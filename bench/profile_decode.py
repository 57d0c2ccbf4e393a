"""Where a decode step's time goes (GPU): for random-init engines of the SmolLM2 shape (or --shape 1b / 8b:
Llama-3.2-1B / Llama-3-8B), the kernels of one decode step run eagerly (torch.profiler: count and summed
kernel time by kernel) against the same step replayed from its CUDA graph (CUDA events), and the decode-shaped
GEMMs (M = batch) timed per path: our CUDA-core kernel, our Hopper kernel, cuBLAS FP16 (20 calls in one CUDA
graph, weights L2-resident). Prints markdown; --out writes JSON.

    python bench/profile_decode.py --configs none w8a8 --batches 1 8 32 --out bench/results/profile_decode.json
    python bench/profile_decode.py --shape 8b --cache-len 2048 --configs w8a8 --batches 1 16 --no-gemm
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zqcompile as zq  # noqa: E402
from bench.bench_e2e import time_ms  # noqa: E402
from bench.bench_gemm import time_graph  # noqa: E402
from bench.bench_generate import make_model  # noqa: E402
from zqcompile.ops import quant_math as qm  # noqa: E402

PROMPT = 128


def decode_inputs(gen, batch: int, step: int, prompt: int = PROMPT):
    dev = gen.device
    ids = torch.randint(3, 1000, (batch, 1), device=dev)
    pos = torch.full((batch, 1), prompt + step, device=dev)
    mask = torch.zeros(batch, gen.spec.max_cache_len, dtype=torch.long, device=dev)
    mask[:, :prompt + step + 1] = 1
    return ids, pos, torch.tensor([prompt + step], device=dev), mask


def kernel_table(fn, reps: int = 5) -> tuple[dict[str, tuple[int, float]], int, float]:
    """{kernel name: (launches per step, us per step)}, kernels per step, summed kernel us per step."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    agg: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            a = agg[e.name[:70]]
            a[0] += 1
            a[1] += e.device_time
    table = {k: (int(v[0] / reps), v[1] / reps) for k, v in agg.items()}
    return table, sum(c for c, _ in table.values()), sum(t for _, t in table.values())


def gemm_rows(shapes: list[tuple[int, int]], ms: list[int]) -> list[dict]:
    from zqcompile.plugins import cuda_gemm as C
    rows = []
    for k, n in shapes:
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.05
        wq, ws = qm.quantize_weight(w.float(), 8)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            xq, xs = qm.quantize_per_token(x)
            xs = xs.reshape(m).contiguous()
            out = torch.empty(m, n, device="cuda", dtype=torch.float16)
            row = dict(k=k, n=n, m=m, fp16_us=1e3 * time_graph(lambda i: torch.matmul(x, w.t(), out=out), 20),
                       simt_us=1e3 * time_graph(
                           lambda i: C.run_gemm("simt", xq, xs, wq, ws, None, None, "none", 8, out), 20))
            row["mma_us"] = 1e3 * time_graph(
                lambda i: C.run_gemm("mma", xq, xs, wq, ws, None, None, "none", 8, out), 20)
            if C.sm90_usable("cuda"):
                row["sm90_us"] = 1e3 * time_graph(
                    lambda i: C.run_gemm("sm90", xq, xs, wq, ws, None, None, "none", 8, out), 20)
            rows.append(row)
    return rows


def profile_config(model, cfg: str, batches: list[int], top_n: int, prompt: int = PROMPT,
                   shape: str = "smollm2") -> list[dict]:
    engine = zq.compile(model, (torch.randint(3, 1000, (1, 16), device="cuda"),), config=cfg,
                        generation=zq.CacheSpec(max(batches), prompt + 50))
    gen = engine.prepare_generation(max_batch=max(batches), max_cache_len=prompt + 50)
    steps = []
    for b in batches:
        inp = decode_inputs(gen, b, 0, prompt)
        with torch.no_grad():
            table, count, kernel_us = kernel_table(lambda inp=inp: gen.decode(*inp))
            graph_us = 1e3 * time_ms(lambda inp=inp: gen._decode_step(*inp), 20)
        top = sorted(table.items(), key=lambda kv: -kv[1][1])[:top_n]
        steps.append({"shape": shape, "cache_len": prompt, "config": cfg, "batch": b, "kernels": count,
                      "kernel_us": kernel_us, "graph_us": graph_us,
                      "top": [(k, c, t) for k, (c, t) in top]})
        print(f"\n### {shape} {cfg} batch {b}, cache {prompt}: {count} kernels/step, kernel time {kernel_us:.0f} us, "
              f"CUDA-graph step {graph_us:.0f} us\n\n| kernel | launches | us |\n|---|---|---|")
        for k, (c, t) in top:
            print(f"| `{k}` | {c} | {t:.1f} |")
    return steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["none", "w8a8"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--shape", default="smollm2", choices=["smollm2", "1b", "8b"],
                    help="SmolLM2-135M, or bench_decode_scale's Llama-3.2-1B / Llama-3-8B shapes (random init)")
    ap.add_argument("--cache-len", type=int, default=PROMPT, help="filled cache slots at the profiled step")
    ap.add_argument("--no-gemm", action="store_true", help="skip the decode GEMM table")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from zqcompile import plugins
    plugins.load()
    if args.shape == "smollm2":
        model = make_model("smollm2", False, torch.float16, "cuda")
    else:
        from bench.bench_decode_scale import make_model as llama_shape
        model = llama_shape(args.shape, False, torch.float16, "cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "argv": sys.argv, "steps": []}
    for cfg in args.configs:
        result["steps"] += profile_config(model, cfg, args.batches, args.top, args.cache_len, args.shape)
        torch.cuda.empty_cache()
    if any(c != "none" for c in args.configs) and not args.no_gemm:
        rows = gemm_rows([(576, 960), (576, 576), (576, 3072), (1536, 576), (1024, 3072), (4096, 1024)],
                         [1, 2, 4, 8, 16, 32, 64])
        result["gemm"] = rows
        print("\n| K | N | M | cuBLAS fp16 us | simt us | mma us | sm90 us |\n|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['k']} | {r['n']} | {r['m']} | {r['fp16_us']:.1f} | {r['simt_us']:.1f} | {r['mma_us']:.1f} | "
                  f"{r.get('sm90_us', 0):.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
