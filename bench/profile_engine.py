"""Where an engine's GPU time goes: torch.profiler kernel table for the zq engine (CUDA graphs off, so every
kernel is attributed) next to Hugging Face eager FP16, one shape. Prints the top kernels by CUDA time.

    python bench/profile_engine.py --model bert-base --batch 128 --seq 128 --config w8a8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zqcompile as zq  # noqa: E402
from bench.bench_e2e import make_model  # noqa: E402


def top_kernels(fn, n: int = 18, reps: int = 5) -> str:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=n, max_name_column_width=60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bert-base")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--config", default="w8a8")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = make_model(args.model).eval().half().cuda()
    ids = torch.randint(0, 1000, (args.batch, args.seq), device="cuda")
    engine = zq.compile(model, (ids[:2],), args.config)
    engine.cuda_graphs = False
    with torch.no_grad():
        print("=== zq", args.config)
        print(top_kernels(lambda: engine(ids)))
        print("=== HF eager fp16")
        print(top_kernels(lambda: model(ids)))


if __name__ == "__main__":
    main()
