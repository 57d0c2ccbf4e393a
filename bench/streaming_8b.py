"""Streamed compile of the Llama-3-8B shape from a safetensors folder under a GPU memory cap below its FP16 size.

1. Writes a random-init FP16 model of the shape (bench/memory_8b.py's) to a safetensors folder, 5 GB shards,
   in a child process (so this process's peak host memory never includes it); skipped when the folder exists
   (--write-only does only this step: a 10-minute device call can then hold the compile alone).
2. zq.compile_folder(folder, ids on the GPU, config, dtype=float16) with
   torch.cuda.set_per_process_memory_fraction at --cap (default 0.75 x the FP16 weights): reports the peak GPU
   memory (torch.cuda.max_memory_allocated), the peak host memory (resident set, getrusage), what the engine
   holds, the streaming stats of the compile record, and greedy tokens.
3. Unless --no-compare: lifts the cap, loads the whole model (load_model, then .to(device)), compiles it in
   memory and compares the two engines bit for bit: every constant of every graph (torch.equal), logits and
   greedy tokens.

Prints a table and writes JSON (device, versions, command line) to --out. Never part of the test suite.
GPU:   python bench/streaming_8b.py --out bench/results/streaming_8b_H200.json
       python bench/streaming_8b.py --layers 4 --out bench/results/streaming_8b_4layers_H200.json
CPU smoke (tiny shape): python bench/streaming_8b.py --tiny --device cpu --out /tmp/streaming_tiny.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.memory_8b import llama3_8b_config  # noqa: E402 - the shape, defined once

GiB = 1 << 30


def llama_config(layers: int, tiny: bool):
    import transformers as T
    if tiny:
        return T.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    return llama3_8b_config(layers)


def write_folder(folder: str, layers: int, tiny: bool, device: str) -> None:
    """Random-init FP16 weights (seed 0), made on `device` and saved in 5 GB shards with save_pretrained."""
    import transformers as T
    torch.manual_seed(0)
    with torch.device(device):
        model = T.LlamaForCausalLM._from_config(llama_config(layers, tiny), dtype=torch.float16).eval()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder, max_shard_size="5GB")


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def host_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def constants(engine) -> dict[str, torch.Tensor]:
    """Every weight of every graph (quantized weights, scales, float parameters), not the KV cache (state)."""
    from zqcompile.generation.kv_cache import is_cache_buffer
    out = {}
    for gname, g in zip(("model", "prefill", "decode"), engine.graphs):
        out.update({f"{gname}:{n}": t for n, t in [*g.named_parameters(), *g.named_buffers()]
                    if not is_cache_buffer(n.rsplit(".", 1)[-1])})
    return out


def streamed(args, folder: str, ids: torch.Tensor, weights: int) -> tuple[object, dict]:
    import zqcompile as zq
    cuda = args.device == "cuda"
    row: dict = {}
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        cap = args.cap * weights
        torch.cuda.set_per_process_memory_fraction(cap / total)
        torch.cuda.reset_peak_memory_stats()
        row.update(gpu_cap_gib=cap / GiB, gpu_total_gib=total / GiB)
    t0 = time.perf_counter()
    engine = zq.compile_folder(folder, (ids,), args.config, dtype=torch.float16 if cuda else torch.float32,
                               generation=zq.CacheSpec(args.max_batch, args.max_cache_len))
    row["compile_s"] = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        row["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / GiB
    row.update(host_peak_rss_gib=host_peak_bytes() / GiB, engine_holds_gib=engine.memory_bytes() / GiB,
               record_memory={k: v / GiB if k.endswith("_bytes") else v for k, v in engine.record.memory.items()})
    row["tokens"] = engine.generate(ids[:1], max_new_tokens=8)[0].tolist()
    if cuda:
        row["gpu_peak_after_generate_gib"] = torch.cuda.max_memory_allocated() / GiB
        torch.cuda.set_per_process_memory_fraction(1.0)
    return engine, row


def compare(args, folder: str, ids: torch.Tensor, engine) -> dict:
    """The in-memory compile of the same folder, and whether it equals the streamed engine bit for bit."""
    import zqcompile as zq
    from zqcompile.models import load_model
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    model = load_model(folder, dtype=dtype).to(args.device)
    t0 = time.perf_counter()
    ref = zq.compile(model, (ids,), args.config, generation=zq.CacheSpec(args.max_batch, args.max_cache_len))
    seconds = time.perf_counter() - t0
    del model
    gc.collect()
    a, b = constants(engine), constants(ref)
    differ = sorted(n for n in set(a) | set(b) if n not in a or n not in b or a[n].dtype != b[n].dtype
                    or not torch.equal(a[n], b[n]))
    x = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1)).to(args.device)
    with torch.no_grad():
        same_logits = torch.equal(engine(x).logits, ref(x).logits)
    same_tokens = torch.equal(engine.generate(x, max_new_tokens=8), ref.generate(x, max_new_tokens=8))
    return dict(in_memory_compile_s=seconds, constants_compared=len(a), constants_differing=len(differ),
                differing_examples=differ[:5], logits_equal=same_logits, greedy_tokens_equal=same_tokens,
                bit_for_bit=not differ and same_logits and same_tokens)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--tiny", action="store_true", help="a tiny shape (smoke test of the script)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default="w8a8")
    p.add_argument("--cap", type=float, default=0.75, help="GPU memory cap as a fraction of the FP16 weights")
    p.add_argument("--folder", help="safetensors folder (default build-streaming/llama3_8b_<layers>l[_tiny]: an "
                                    "ignored path of the checkout, so it stays between runs on a warm machine)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-cache-len", type=int, default=256)
    p.add_argument("--no-compare", action="store_true", help="skip the in-memory compile and the comparison")
    p.add_argument("--out", default="bench/results/streaming_8b.json")
    p.add_argument("--write-only", action="store_true", help="only write the folder (step 1), in this process")
    p.add_argument("--alloc-conf", default="expandable_segments:True",
                   help="PYTORCH_CUDA_ALLOC_CONF for the compile ('' for torch's default)")
    args = p.parse_args(argv)
    folder = args.folder or f"build-streaming/llama3_8b_{args.layers}l{'_tiny' if args.tiny else ''}"
    if args.write_only:
        write_folder(folder, args.layers, args.tiny, args.device)
        return 0
    if not os.path.isfile(os.path.join(folder, "config.json")):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--folder", folder,
                        "--write-only"], check=True)
        print(f"wrote {folder} ({folder_bytes(folder) / GiB:.2f} GiB) in {time.perf_counter() - t0:.0f} s")
    if args.alloc_conf and args.device == "cuda" and not torch.cuda.is_initialized():
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", args.alloc_conf)  # read when CUDA initialises
    if args.device == "cuda":
        try:
            import zqcompile.plugins  # noqa: F401 - registers the CUDA kernels of the zq ops when built
        except ImportError:
            print("warning: zqcompile.plugins not importable: zq ops run their reference implementations",
                  file=sys.stderr)
    weights = folder_bytes(folder)  # FP16 bytes of the model
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0)).to(args.device)
    engine, row = streamed(args, folder, ids, weights)
    row.update(config=args.config, layers=args.layers, tiny=args.tiny, fp16_weights_gib=weights / GiB)
    if not args.no_compare:
        row["compare"] = compare(args, folder, ids, engine)
    print(f"| layers | FP16 weights GiB | GPU cap GiB | GPU peak GiB | host peak RSS GiB | engine GiB | compile s "
          f"| bit for bit |\n|---|---|---|---|---|---|---|---|\n| {args.layers} | {weights / GiB:.2f} | "
          f"{row.get('gpu_cap_gib', float('nan')):.2f} | {row.get('gpu_peak_gib', float('nan')):.2f} | "
          f"{row['host_peak_rss_gib']:.2f} | {row['engine_holds_gib']:.2f} | {row['compile_s']:.0f} | "
          f"{row['compare']['bit_for_bit'] if 'compare' in row else '-'} |")
    import safetensors
    import transformers
    meta = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", torch=torch.__version__,
                transformers=transformers.__version__, safetensors=safetensors.__version__,
                command=" ".join([sys.executable, *sys.argv]), folder=folder,
                alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), rows=[row])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
