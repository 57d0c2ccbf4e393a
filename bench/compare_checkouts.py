"""Two zqcompile checkouts timed in the same run on the GPU (a restructuring must leave the speed as it was):
BERT-base W8A8 forwards (sequence 128, batch 1/16/128) and SmolLM2-135M-shaped generation (random init, FP16,
128-token prompt, 50 new tokens, batch 1/8, configs none/w8a8), each checkout in its own process with its
own package on PYTHONPATH, in the order old, new, old, new, so the spread between the two runs of one
checkout shows the noise. Timings are CUDA-event medians (engine forwards) and wall-clock over synchronized
generate() calls (ms per token, prefill included), as bench_e2e / bench_generate time them.

Usage: python bench/compare_checkouts.py --old DIR --new DIR [--lib build/libzq_kernels.so]
       [--old-lib LIB --new-lib LIB] [--out bench/results/compare_checkouts.json]
(--old-lib / --new-lib when the two checkouts bind different library ABIs; each defaults to --lib.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

WORKER = r'''
import json, os, sys, time, torch, transformers as T
NEW = int(os.environ.get("ZQ_BENCH_NEW_TOKENS", "50"))
PRESETS = os.environ.get("ZQ_BENCH_PRESETS", "none,w8a8").split(",")
import zqcompile as zq

def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

def events_ms(fn, reps=30):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]

def compile_gen(model, ids, cfg, batch, cache_len):
    if hasattr(zq, "CacheSpec"):  # weights shared by construction: generation graphs built by compile
        return zq.compile(model, (ids,), cfg, generation=zq.CacheSpec(batch, cache_len))
    e = zq.compile(model, (ids,), cfg)  # the older API
    e.prepare_generation(max_batch=batch, max_cache_len=cache_len)
    return e

rows = []
torch.manual_seed(0)
bert = T.BertModel(T.BertConfig()).eval().cuda().half()
x = torch.randint(0, 30000, (2, 128), device="cuda")
log("bert compile"); e = zq.compile(bert, (x,), "w8a8", **({"generation": False} if hasattr(zq, "CacheSpec") else {}))
for b in (1, 16, 128):
    xb = torch.randint(0, 30000, (b, 128), device="cuda")
    with torch.no_grad():
        rows.append({"case": f"bert-base w8a8 b{b} s128", "ms": events_ms(lambda: e(xb))})
del e, bert
cfg = T.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
lm = T.LlamaForCausalLM(cfg).eval().cuda().half()
prompt, new = 128, NEW
for preset in PRESETS:
    log(f"smollm2 {preset} compile")
    ids1 = torch.randint(3, 49152, (1, prompt), device="cuda")
    e = compile_gen(lm, ids1, preset, 8, prompt + new)
    for b in (1, 8):
        ids = torch.randint(3, 49152, (b, prompt), device="cuda")
        e.generate(ids, max_new_tokens=new)  # CUDA graphs captured here
        torch.cuda.synchronize()
        runs = []
        for _ in range(7):
            t0 = time.perf_counter(); e.generate(ids, max_new_tokens=new); torch.cuda.synchronize()
            runs.append(time.perf_counter() - t0)
        rows.append({"case": f"smollm2-shape {preset} b{b} generate", "ms": 1e3 * sorted(runs)[3] / new})
    del e
print(json.dumps(rows))
'''


def run(checkout: str, lib: str | None) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=checkout, PYTHONUNBUFFERED="1")
    if lib:
        env["ZQ_CUDA_LIB"] = os.path.abspath(lib)
    res = subprocess.run([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE, text=True, cwd=checkout)
    if res.returncode != 0:
        raise SystemExit(f"{checkout}: worker failed (its stderr is above)")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", required=True)
    ap.add_argument("--lib", default=None, help="libzq_kernels.so both checkouts use (ZQ_CUDA_LIB)")
    ap.add_argument("--old-lib", default=None, help="the old checkout's library (default: --lib)")
    ap.add_argument("--new-lib", default=None, help="the new checkout's library (default: --lib)")
    ap.add_argument("--order", default="old,new,old,new", help="the order of the worker runs")
    ap.add_argument("--out", default="bench/results/compare_checkouts.json")
    args = ap.parse_args()
    runs = {"old": [], "new": []}
    for which in args.order.split(","):
        runs[which].append(run(getattr(args, which), getattr(args, f"{which}_lib") or args.lib))
        with open(args.out + ".partial", "w") as f:  # a run cut short keeps what it measured
            json.dump(runs, f, indent=1)
    cases = [r["case"] for r in runs["new"][0]]
    table = []
    print(f"{'case':34} {'old ms (2 runs)':>18} {'new ms (2 runs)':>18} {'new/old':>8}")
    for i, case in enumerate(cases):
        old = [r[i]["ms"] for r in runs["old"]]
        new = [r[i]["ms"] for r in runs["new"]]
        ratio = (sum(new) / len(new)) / (sum(old) / len(old))
        table.append({"case": case, "old_ms": old, "new_ms": new, "new_over_old": ratio})
        print(f"{case:34} {' '.join(f'{v:8.3f}' for v in old):>18} {' '.join(f'{v:8.3f}' for v in new):>18} "
              f"{ratio:8.3f}")
    import torch
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv),
                   "old": args.old, "new": args.new, "old_lib": args.old_lib or args.lib,
                   "new_lib": args.new_lib or args.lib, "rows": table}, f, indent=1)


if __name__ == "__main__":
    main()
