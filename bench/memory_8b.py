"""GPU memory of compiling and holding an engine at the Llama-3-8B shape (random-init FP16 model already on the
GPU, as users load it): compile peak above the model, what the engine holds after the float model is deleted
against what its graphs read (engine.memory_bytes(): every constant once, the KV cache included), and what is
left after the engine is deleted. Issue 12's targets: held <= 1.1x memory_bytes, compile peak <= model + 1.2x
the quantized size, nothing left after del + empty_cache.

Usage: python bench/memory_8b.py [--config w4/8a8] [--layers 32] [--out bench/results/memory_8b_H200.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch
import transformers as T

import zqcompile as zq

GiB = 1 << 30


def llama3_8b_config(layers: int = 32) -> T.LlamaConfig:
    """The Llama-3-8B shape (bench/streaming_8b.py writes it to a folder)."""
    return T.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                         rope_theta=500000.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="w4/8a8")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-cache-len", type=int, default=256)
    ap.add_argument("--out", default="bench/results/memory_8b_H200.json")
    args = ap.parse_args()
    cfg = llama3_8b_config(args.layers)
    torch.manual_seed(0)
    base = torch.cuda.memory_allocated()
    with torch.device("cuda"):
        model = T.LlamaForCausalLM._from_config(cfg, torch_dtype=torch.float16).eval()
    torch.cuda.synchronize()
    model_bytes = torch.cuda.memory_allocated() - base
    ids = torch.randint(0, cfg.vocab_size, (1, 16), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = zq.compile(model, (ids,), args.config, generation=zq.CacheSpec(args.max_batch, args.max_cache_len))
    compile_s = time.perf_counter() - t0
    peak_above_model = torch.cuda.max_memory_allocated() - base - model_bytes
    del model
    gc.collect()
    torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated() - base
    need = engine.memory_bytes()
    out = engine.generate(ids, max_new_tokens=4)
    assert out.shape == (1, 20)
    held_after_generate = torch.cuda.memory_allocated() - base
    del engine, out
    gc.collect()
    torch.cuda.empty_cache()
    left = torch.cuda.memory_allocated() - base
    row = dict(config=args.config, layers=args.layers, cache=[args.max_batch, args.max_cache_len],
               model_gib=model_bytes / GiB, compile_s=compile_s, compile_peak_above_model_gib=peak_above_model / GiB,
               engine_reads_gib=need / GiB, engine_holds_gib=held / GiB, holds_after_generate_gib=held_after_generate / GiB,
               left_after_del_gib=left / GiB, holds_over_reads=held / need, peak_over_quantized=peak_above_model / need,
               targets=dict(holds_over_reads=1.1, peak_over_quantized=1.2, left_after_del_gib=0.01))
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, command=" ".join(sys.argv), rows=[row])
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
