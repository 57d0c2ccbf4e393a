"""Tensor-parallel decode benchmark: decode ms/token of the Llama-3-8B shape (random-init FP16, 32 layers,
32 / 8 heads, MLP 14336, vocab 128256) at batch 1 and 16, W8A8 and FP16 (preset none), on one GPU (TP1) and
split over two (TP2: column-parallel q/k/v and gate/up, row-parallel o_proj and down_proj, NCCL all-reduce),
timed in one launch: rank 0 runs TP1 first while rank 1 waits, then both ranks run TP2. Decode-only ms/token =
(generate(new) - generate(1)) / (new - 1), the median of --repeat runs after a warm-up. Prints a markdown table
and writes JSON (device, versions, command line). Never part of the test suite.

GPU (2 GPUs, from the checkout):  PYTHONPATH=. torchrun --nproc-per-node 2 bench/bench_tp.py --out bench/results/tp_8b_H200x2.json
  quicker:     ... --layers 8 --configs w8a8       (each 8B compile takes ~1.5 min; a device command has 10)
CPU smoke (tiny Llama, gloo, fp32):  torchrun --nproc-per-node 2 bench/bench_tp.py --tiny --device cpu --out x.json
The decode steps replay CUDA graphs, the NCCL all-reduce captured in them; --eager runs them without graphs (a
fallback to say in the results if capture fails).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

import zqcompile as zq


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="the tiny Llama (smoke test of the script)")
    p.add_argument("--layers", type=int, default=32, help="decoder layers of the 8B shape (fewer: a quicker run)")
    p.add_argument("--configs", nargs="+", default=["w8a8", "none"], help="presets (none = FP16)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--phases", nargs="+", choices=("tp1", "tp2"), default=["tp1", "tp2"])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--eager", action="store_true", help="no CUDA graphs for prefill / decode")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="process-group timeout in seconds (rank 1 waits while rank 0 runs TP1)")
    p.add_argument("--out", default="bench_tp.json")
    args = p.parse_args(argv)
    if args.new < 2:
        p.error("--new must be >= 2 (decode ms/token is (generate(new) - generate(1)) / (new - 1))")
    return args


def make_model(args: argparse.Namespace, device: torch.device):
    """The same random weights on every rank (one seed, one device type)."""
    import transformers as T
    if args.tiny:
        from zqcompile.models import tiny_model
        return tiny_model("llama").to(device)
    cfg = T.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                        rope_theta=500000.0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = T.LlamaForCausalLM._from_config(cfg, torch_dtype=torch.float16).eval()
    model.generation_config.pad_token_id = 0
    return model


def decode_ms(engine, ids: torch.Tensor, new: int, repeat: int) -> float:
    """Median decode-only ms/token: (generate(new) - generate(1)) / (new - 1)."""
    def timed(n: int) -> float:
        if ids.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.generate(ids, max_new_tokens=n)
        if ids.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    timed(new), timed(1)  # warm-up: CUDA graphs per batch bucket, kernels
    return statistics.median(1e3 * (timed(new) - timed(1)) / (new - 1) for _ in range(max(repeat, 1)))


def bench(args, tp: int, rank: int, device: torch.device) -> list[dict]:
    model = make_model(args, device)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    ids_of = {b: torch.randint(3, vocab, (b, args.prompt), generator=gen).to(device) for b in args.batches}
    rows = []
    for cfg in args.configs:
        t0 = time.perf_counter()
        engine = zq.compile(model, (ids_of[args.batches[0]],), cfg,
                            generation=zq.CacheSpec(max(args.batches), args.prompt + args.new),
                            tp=zq.TensorParallel(tp, device=device.type, timeout_s=args.timeout) if tp > 1 else None)
        compile_s = time.perf_counter() - t0
        if args.eager:
            engine.cuda_graphs = engine._generator.cuda_graphs = False
        for b in args.batches:
            ms = decode_ms(engine, ids_of[b], args.new, args.repeat)
            rows.append(dict(tp=tp, config=cfg, batch=b, decode_ms_per_token=ms, compile_s=compile_s,
                             engine_bytes_per_rank=engine.memory_bytes(), rank=rank))
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del model
    gc.collect()
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| config | batch | TP1 ms/token | TP2 ms/token | TP2 / TP1 |", "|---|---|---|---|---|"]
    keys = sorted({(r["config"], r["batch"]) for r in rows})
    for cfg, b in keys:
        t = {r["tp"]: r["decode_ms_per_token"] for r in rows if (r["config"], r["batch"]) == (cfg, b)}
        ratio = f"{t[2] / t[1]:.2f}" if 1 in t and 2 in t else "-"
        lines.append(f"| {cfg} | {b} | {t.get(1, float('nan')):.2f} | {t.get(2, float('nan')):.2f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch.distributed as dist
    from zqcompile.parallel.group import join
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "tp2" in args.phases and world != 2:
        print("bench_tp: TP2 needs two ranks: torchrun --nproc-per-node 2 bench/bench_tp.py ...", file=sys.stderr)
        return 2
    rank = 0
    if world > 1:  # the group first, with the long timeout: rank 1 waits in it while rank 0 runs TP1
        r = join(zq.TensorParallel(world, device=args.device, timeout_s=args.timeout), torch.device(args.device))
        rank = r.rank
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    if args.device == "cuda":
        import zqcompile.plugins  # noqa: F401 - the CUDA kernels of the zq ops, when the library is built
    rows = []
    if "tp1" in args.phases:
        if rank == 0:
            rows += bench(args, 1, rank, device)
        if world > 1:
            dist.barrier()
    if "tp2" in args.phases:
        rows += bench(args, 2, rank, device)
    if rank == 0:
        print(markdown(rows))
        gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        result = dict(device=f"{world} x {gpu}", torch=torch.__version__,
                      transformers=__import__("transformers").__version__,
                      nccl=".".join(map(str, torch.cuda.nccl.version())) if args.device == "cuda" else None,
                      command=(f"torchrun --nproc-per-node {world} " if "TORCHELASTIC_RUN_ID" in os.environ else "python ")
                      + " ".join(sys.argv), eager=args.eager,
                      shape="tiny llama" if args.tiny else f"Llama-3-8B shape, {args.layers} layers, FP16",
                      prompt=args.prompt, new_tokens=args.new, rows=rows)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.out}")
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
