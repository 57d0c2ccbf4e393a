"""Generation benchmark: prefill latency (batch 1, prompt 128) and 50-token generation at batch 1, 8, 32 for
Hugging Face eager generate, Hugging Face static cache + torch.compile, and our engines (none = FP16, w8a8,
w4/8a8), on random-init models of the SmolLM2-135M shape and the GPT-2-medium shape (the paper's GPT-3-350M).
Prints a markdown table and writes JSON (device, versions, command line). Never part of the test suite.

GPU:  python bench/bench_generate.py --out bench/results/generate.json
CPU smoke (tiny shapes, fp32):  python bench/bench_generate.py --device cpu --tiny
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import zqcompile as zq

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}


def make_model(shape: str, tiny: bool, dtype: torch.dtype, device: str):
    import transformers as T
    torch.manual_seed(0)
    if shape == "smollm2":
        cfg = T.LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                            intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048,
                            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
        if tiny:
            cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size = 2, 128, 256, 1000
        model = T.LlamaForCausalLM(cfg)
    else:
        cfg = T.GPT2Config(n_embd=1024, n_layer=24, n_head=16, n_positions=1024, vocab_size=50257)
        if tiny:
            cfg.n_layer, cfg.n_embd, cfg.vocab_size = 2, 128, 1000
        model = T.GPT2LMHeadModel(cfg)
    model.generation_config.pad_token_id = 0
    return model.to(device=device, dtype=dtype).eval()


def timed(fn, device: str, repeat: int) -> float:
    """Median seconds of `repeat` runs after one warm-up."""
    fn()
    out = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def bench_hf(model, ids, new: int, compiled: bool, device: str, repeat: int) -> float:
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    if compiled:
        kw["cache_implementation"] = "static"  # transformers compiles the decode forward itself
    with torch.no_grad():
        return timed(lambda: model.generate(ids, **kw), device, repeat)


def bench_engine(engine, ids, new: int, device: str, repeat: int) -> float:
    return timed(lambda: engine.generate(ids, max_new_tokens=new), device, repeat)


def prefill_seconds(engine, ids, device: str, repeat: int) -> float:
    gen = engine._generator
    s = ids.shape[1]
    pos = torch.arange(s, device=device).expand_as(ids)
    mask = torch.zeros(ids.shape[0], gen.spec.max_cache_len, dtype=torch.long, device=device)
    mask[:, :s] = 1
    with torch.no_grad():
        return timed(lambda: gen._prefill(ids, pos, torch.arange(s, device=device), mask), device, repeat)


def run(args) -> list[dict]:
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    batches = [1, 2] if args.tiny else [1, 8, 32]
    prompt, new = (16, 8) if args.tiny else (128, 50)
    hbm = next((v for k, v in HBM_BYTES_PER_S.items() if args.device == "cuda" and k in torch.cuda.get_device_name()), None)
    rows = []
    for shape in args.shapes:
        model = make_model(shape, args.tiny, dtype, args.device)
        vocab = model.config.vocab_size
        ids_of = {b: torch.randint(3, vocab, (b, prompt), device=args.device) for b in batches}
        for b in batches:
            for name in ("hf-eager", "hf-static-compile"):
                if name == "hf-static-compile" and args.device == "cpu":
                    continue  # minutes of inductor compile on CPU; the GPU run measures it
                sec = bench_hf(model, ids_of[b], new, name != "hf-eager", args.device, args.repeat)
                rows.append(dict(shape=shape, engine=name, batch=b, ms_per_token=1e3 * sec / new,
                                 tokens_per_s=b * new / sec))
        for cfg in args.configs:
            engine = zq.compile(model, (ids_of[1],), config=cfg,
                                generation=zq.CacheSpec(max(batches), prompt + new))
            wbytes = engine.weight_bytes()
            pre = prefill_seconds(engine, ids_of[1], args.device, args.repeat)
            for b in batches:
                sec = bench_engine(engine, ids_of[b], new, args.device, args.repeat)
                per_tok = (sec - (pre if b == 1 else 0)) / max(new - 1, 1)
                rows.append(dict(shape=shape, engine=f"zq-{cfg}", batch=b, ms_per_token=1e3 * sec / new,
                                 tokens_per_s=b * new / sec, prefill_ms_bs1=1e3 * pre, weight_bytes=wbytes,
                                 hbm_fraction=(wbytes / per_tok / hbm) if hbm else None))
            del engine
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | engine | batch | ms/token | tokens/s | prefill bs1 ms | weight-read HBM fraction |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        pre = f"{r['prefill_ms_bs1']:.2f}" if "prefill_ms_bs1" in r else "-"
        hbm = f"{r['hbm_fraction']:.3f}" if r.get("hbm_fraction") else "-"
        lines.append(f"| {r['shape']} | {r['engine']} | {r['batch']} | {r['ms_per_token']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {pre} | {hbm} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test of the script)")
    p.add_argument("--shapes", nargs="+", default=["smollm2", "gpt2-medium"])
    p.add_argument("--configs", nargs="+", default=["none", "w8a8", "w4/8a8"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default="bench_generate.json")
    args = p.parse_args(argv)
    if args.device == "cuda":
        try:
            import zqcompile.plugins  # noqa: F401 - registers the CUDA kernels of the zq ops when built
        except ImportError:
            print("warning: zqcompile.plugins not importable: zq ops run their reference implementations", file=sys.stderr)
    rows = run(args)
    table = markdown(rows)
    print(table)
    meta = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", torch=torch.__version__,
                transformers=__import__("transformers").__version__, argv=sys.argv, rows=rows)
    with open(args.out, "w") as f:
        json.dump(meta, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
