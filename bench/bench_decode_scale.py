"""Decode at deployment scale (issue 13): decode-only ms/token of random-init FP16 Llama-3.2-1B and Llama-3-8B
shapes at batch 1, 4, 16, 64 and cache lengths 128 and 4096, for Hugging Face static cache + torch.compile and
our FP16 (`none`), W8A8 and W4/8A8 engines; tokens/s; CUDA kernels per decode step; weight-read bandwidth and
its fraction of the GPU's HBM peak; then the decode GEMM table (M = 1, 4, 16, 64 on the 8B layer shapes: us and
TB/s for cuBLAS FP16 and our INT8 / INT4 kernels, as the chooser picks them).

decode_ms = (generate(N) - generate(1)) / (N - 1), each the median of --repeat runs timed with CUDA events; the
prompt is cache_len tokens (the cache the decode steps attend to). A row whose prefill does not fit (the
engine's prefill graph holds [batch, cache_len, vocab] logits: 67 GB at batch 64 x 4096) is timed instead as
N - 1 replays of the decode step over a cache_len-slot mask ("method": "decode_step"); any other failure is
recorded in the row ("error") and the run goes on. Kernels per step = CUDA kernels (torch.profiler) of
generate(3) minus those of generate(2). Weight bytes: every constant the engine reads (engine.weight_bytes(),
the embedding table included, as issue 13's floors count it); HF: its parameters.

GPU (fits one 10-minute device call per shape):
    python bench/bench_decode_scale.py --shapes 1b --out bench/results/decode_scale_H200.json
    python bench/bench_decode_scale.py --shapes 8b --engines w8a8,none --batches 1,16 --gemm
    python bench/bench_decode_scale.py --merge a.json b.json --out bench/results/decode_scale_H200.json
CPU smoke (2 layers, hidden 64, reference ops; timings meaningless):  python bench/bench_decode_scale.py --smoke
The device calls of issue 13, in order: scripts/gpu_issue13.sh (bench/NOTES_kernels.md says how).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zqcompile as zq  # noqa: E402

PEAK_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}
SHAPES = {  # hidden, layers, MLP, tied embeddings (Llama-3.2-1B ties them, Llama-3-8B does not)
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, tie_word_embeddings=False),
}
SMOKE_SHAPE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, tie_word_embeddings=False,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
ENGINES = ("hf-static-compile", "none", "w8a8", "w4/8a8", "fp8")  # zq presets but the first
GEMM_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # K x N: qkv, o, gate+up, down
SMOKE_GEMM_SHAPES = [(64, 96), (128, 64)]
GEMM_MS = [1, 4, 16, 64]


def csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


# ---- timing ----------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def elapsed_ms(fn, device: str) -> float:
    if device != "cuda":
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def median_ms(fn, device: str, repeat: int) -> float:
    fn()  # warm-up: compiles, CUDA graph captures
    sync(device)
    return statistics.median(elapsed_ms(fn, device) for _ in range(repeat))


def kernel_count(fn, device: str) -> int:
    """CUDA kernels one call launches (torch.profiler; CUDA-graph replays included). CPU: aten ops."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    sync(device)
    acts = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    if device == "cuda":
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


# ---- models and engines ------------------------------------------------------------------------------------
def make_model(shape: str, smoke: bool, dtype: torch.dtype, device: str):
    import transformers as T
    fields = SMOKE_SHAPE if smoke else dict(SHAPES[shape], num_attention_heads=32, num_key_value_heads=8,
                                            vocab_size=128256)
    cfg = T.LlamaConfig(**fields, max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = T.LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def hf_generate(model, smoke: bool, max_cache_len: int):
    """HF generate with one StaticCache per batch size, sized max_cache_len (reset before each call): every
    generate(N) of a batch runs the same static shapes, so transformers' automatic torch.compile of the decode
    forward compiles once per (batch, cache length), not once per N."""
    import transformers as T
    caches: dict[int, object] = {}

    def run(ids, new):
        b = ids.shape[0]
        if b not in caches:
            caches[b] = T.StaticCache(config=model.config, max_cache_len=max_cache_len)
        cache = caches[b]
        cache.reset()
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, past_key_values=cache)
        if smoke:
            kw["disable_compile"] = True  # inductor on CPU takes minutes; the GPU run compiles
        with torch.no_grad():
            return model.generate(ids, **kw)
    return run


def engine_generate(engine):
    return lambda ids, new: engine.generate(ids, max_new_tokens=new)


def decode_loop_ms(engine, batch: int, cache_len: int, steps: int, device: str, repeat: int) -> float:
    """ms per decode step: `steps` replays of the decode step over a cache_len-slot mask (no prefill)."""
    gen = engine.prepare_generation()
    ids = torch.randint(3, 200, (batch, 1), device=device)
    mask = torch.zeros(batch, gen.spec.max_cache_len, dtype=torch.long, device=device)
    mask[:, :cache_len] = 1

    def loop():
        with torch.no_grad():
            for t in range(steps):
                mask[:, cache_len + t] = 1
                pos = torch.full((batch, 1), cache_len + t, device=device)
                gen._decode_step(ids, pos, torch.tensor([cache_len + t], device=device), mask)
    return median_ms(loop, device, repeat) / steps


def hf_weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def measure(run, ids, new: int, device: str, repeat: int) -> dict:
    t1 = median_ms(lambda: run(ids, 1), device, repeat)
    tn = median_ms(lambda: run(ids, new), device, repeat)
    return dict(method="generate", generate_1_ms=t1, generate_n_ms=tn, decode_ms=(tn - t1) / (new - 1))


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def bench_rows(model, shape: str, engine_name: str, args, peak, rows: list[dict], save=lambda: None) -> None:
    """Rows of one engine at every (cache_len, batch), appended to `rows` (save() after each: a device call cut
    short keeps the rows done); a zq engine is compiled once per cache length (its preallocated cache sized for
    cache_len + new tokens, as a deployment for that context would be)."""
    vocab = model.config.vocab_size
    for cache_len in args.cache_lens:
        engine = None
        try:
            if engine_name.startswith("hf"):
                run, wbytes = hf_generate(model, args.smoke, cache_len + args.new), hf_weight_bytes(model)
            else:
                t0 = time.perf_counter()
                engine = zq.compile(model, (torch.randint(3, vocab, (1, 16), device=args.device),), config=engine_name,
                                    generation=zq.CacheSpec(max(args.batches), cache_len + args.new))
                compile_s = time.perf_counter() - t0
                run, wbytes = engine_generate(engine), engine.weight_bytes()
        except Exception as e:  # noqa: BLE001 - recorded in the rows, the run goes on
            rows += [dict(shape=shape, engine=engine_name, batch=b, cache_len=cache_len, error=repr(e)[:300])
                     for b in args.batches]
            save()
            free(args.device)
            continue
        for b in args.batches:
            row = dict(shape=shape, engine=engine_name, batch=b, cache_len=cache_len, new_tokens=args.new,
                       weight_bytes=wbytes)
            if engine is not None:
                row["compile_s"] = compile_s
            ids = torch.randint(3, vocab, (b, cache_len), device=args.device)
            try:
                try:
                    row.update(measure(run, ids, args.new, args.device, args.repeat))
                except Exception as e:  # noqa: BLE001
                    if engine is None or not is_oom(e):
                        raise
                    free(args.device)
                    row.update(method="decode_step", prefill_error=repr(e)[:200],
                               decode_ms=decode_loop_ms(engine, b, cache_len, args.new - 1, args.device,
                                                        args.repeat))
                if row["method"] == "generate":
                    row["kernels_per_step"] = (kernel_count(lambda: run(ids, 3), args.device)
                                               - kernel_count(lambda: run(ids, 2), args.device))
                    if args.ab_skinny and engine is not None and engine_name != "none":
                        row.update(skinny_ab(engine, run, ids, args))
                    if args.ab_pdl and engine is not None:
                        row.update(pdl_ab(engine, run, ids, args))
                    if args.ab_act_strided and engine is not None and engine_name != "none":
                        row.update(act_strided_ab(engine, run, ids, args))
                    if args.ab_merge and engine is not None:
                        row.update(merge_ab(engine, run, ids, args))
                    if args.ab_attn_rule and engine is not None:
                        row.update(attn_rule_ab(engine, run, ids, args))
                    if args.ab_prefetch and engine is not None and engine_name != "none":
                        row.update(prefetch_sweep(engine, run, ids, args))
            except Exception as e:  # noqa: BLE001
                row["error"] = repr(e)[:300]
                rows.append(row)
                save()
                free(args.device)
                continue
            sec = row["decode_ms"] / 1e3
            row["tokens_per_s"] = b / sec if sec > 0 else None
            row["weight_read_tb_s"] = wbytes / sec / 1e12 if sec > 0 else None
            row["peak_fraction"] = wbytes / sec / peak if peak and sec > 0 else None
            rows.append(row)
            save()
            print(f"  {shape} {engine_name} b{b} L{cache_len}: {row['decode_ms']:.3f} ms/token", flush=True)
            free(args.device)
        engine = run = None  # noqa: F841 - frees the engine before the next compile
        free(args.device)


def measure_under(engine, run, ids, args, modes) -> dict:
    """Decode ms of the same engine under each (key, context manager) of `modes`, in order, its decode graphs
    re-captured under each (the previous graphs and their memory pool released first, as before the row's first
    measurement): {key: ms}."""
    out = {}
    try:
        for key, ctx in modes:
            with ctx():
                engine._generator.reset_runners()
                free(args.device)
                out[key] = measure(run, ids, args.new, args.device, args.repeat)["decode_ms"]
    finally:
        engine._generator.reset_runners()  # graphs captured under the last mode: the next call re-captures
    return out


def interleaved_ab(engine, run, ids, args, name: str, off, on) -> dict:
    """The same engine under `off()` then `on()` (context managers), twice, interleaved (measure_under): decode ms
    of each and off / on, keys decode_ms_<name>_{off,on,off2,on2}."""
    out = measure_under(engine, run, ids, args, [(f"decode_ms_{name}_{tag}", ctx) for tag, ctx in (
        ("off", off), ("on", on), ("off2", off), ("on2", on))])
    out[f"{name}_speedup"] = (out[f"decode_ms_{name}_off"] + out[f"decode_ms_{name}_off2"]) / (
        out[f"decode_ms_{name}_on"] + out[f"decode_ms_{name}_on2"])
    return out


def skinny_ab(engine, run, ids, args) -> dict:
    """The decode-shaped GEMM kernel off, then on as the chooser has it (the choices re-made each time)."""
    from zqcompile.plugins import gemm_kernels as G
    mode = G.SKINNY_MODE
    return interleaved_ab(engine, run, ids, args, "skinny", lambda: G.skinny_mode("0"), lambda: G.skinny_mode(mode))


def switched(name: str, value):
    """The kernel library's switch `name` set for a block (zqcompile.plugins.cuda.switched)."""
    from zqcompile.plugins import cuda as C
    return C.switched(name, value)


def pdl_ab(engine, run, ids, args) -> dict:
    """Programmatic dependent launch of the library's kernels off, then on (zq/launch.cuh)."""
    return interleaved_ab(engine, run, ids, args, "pdl", lambda: switched("pdl", 0), lambda: switched("pdl", -1))


def merge_ab(engine, run, ids, args) -> dict:
    """Split-L attention merging 2-8 splits by the combine kernel, then inside its cluster."""
    return interleaved_ab(engine, run, ids, args, "merge", lambda: switched("attention_merge", "kernel"),
                          lambda: switched("attention_merge", "cluster"))


@contextlib.contextmanager
def attention_splits(n: int):
    """Split-L's split count for a block (0 the library's choice, -2 its earlier two-blocks-an-SM rule)."""
    from zqcompile.plugins import cuda as C
    before, C.decode_attention_splits = C.decode_attention_splits, n
    try:
        yield
    finally:
        C.decode_attention_splits = before


def attn_rule_ab(engine, run, ids, args) -> dict:
    """Split-L's split counts by the earlier rule (two blocks an SM), then by the library's choice."""
    return interleaved_ab(engine, run, ids, args, "attn_rule", lambda: attention_splits(-2),
                          lambda: attention_splits(0))


def prefetch_sweep(engine, run, ids, args) -> dict:
    """The decode GEMMs' L2 prefetch of their weight rows before the PDL wait, at each budget of
    --prefetch-budgets (bytes from a weight's start; 0 none, -1 the library's choice), interleaved, twice, the
    decode graphs re-captured under each (measure_under): keys decode_ms_prefetch_<budget>_<round>."""
    out = measure_under(engine, run, ids, args, [
        (f"decode_ms_prefetch_{budget}_{rnd}", lambda budget=budget: switched("gemm_prefetch", budget))
        for rnd in (1, 2) for budget in args.prefetch_budgets])
    out["prefetch_budgets"] = list(args.prefetch_budgets)
    return out


def act_strided_ab(engine, run, ids, args) -> dict:
    """act_quant copying the gate / up halves to contiguous tensors, then reading them in place."""
    from zqcompile.plugins import cuda as C

    def strided(on: bool):
        return lambda: mock.patch.object(C, "act_quant_strided", on)
    return interleaved_ab(engine, run, ids, args, "act_strided", strided(False), strided(True))


# ---- decode GEMMs ------------------------------------------------------------------------------------------
def gemm_table(args) -> list[dict]:
    from zqcompile.ops import quant_math as qm
    served_by = None
    if args.device == "cuda":
        from zqcompile.plugins.cuda_gemm import served_by
    dt = torch.float16 if args.device == "cuda" else torch.float32
    rows = []
    for k, n in (SMOKE_GEMM_SHAPES if args.smoke else GEMM_SHAPES):
        w = torch.randn(n, k, device=args.device, dtype=dt) * 0.05
        weights = {"int8": qm.quantize_weight(w.float(), 8), "int4": qm.quantize_weight(w.float(), 4, "k_groups",
                                                                                        group_size=min(128, k))}
        for m in (GEMM_MS if not args.smoke else [1, 4]):
            x = torch.randn(m, k, device=args.device, dtype=dt)
            xq, xs = qm.quantize_per_token(x)
            row = dict(k=k, n=n, m=m)
            out = torch.empty(m, n, device=args.device, dtype=dt)
            paths = {"fp16": (lambda: torch.matmul(x, w.t(), out=out), w.numel() * w.element_size())}
            for name, (wq, ws) in weights.items():
                wq, ws = wq.to(args.device), ws.to(args.device)
                bits = 8 if name == "int8" else 4
                paths[name] = (lambda wq=wq, ws=ws, bits=bits: torch.ops.zq.int8_gemm_dequant(
                    xq, xs, wq, ws, None, None, "none", bits, dt), wq.numel() + ws.numel() * 4)
            for name, (fn, wbytes) in paths.items():
                moved = wbytes + x.numel() * x.element_size() + m * n * out.element_size()
                if served_by is not None and name != "fp16":
                    with served_by() as s:
                        fn()
                    row[f"{name}_kernel"] = ",".join(s)
                us = 1e3 * gemm_ms(fn, args.device)
                row[f"{name}_us"], row[f"{name}_tb_s"] = us, moved / us / 1e6
            rows.append(row)
            print(f"  gemm K{k} N{n} M{m}: " + ", ".join(f"{p} {row[p + '_us']:.1f} us" for p in paths), flush=True)
    return rows


def attn_variant(name: str) -> dict:
    """An --attn-variants entry: "auto" (the library's choices), or "+"-joined settings: sN (N splits), old (the
    earlier two-blocks-an-SM rule), kernel (2-8 splits merged by the combine kernel), e.g. "s8+kernel"."""
    out = {"splits": 0, "merge": "cluster"}
    for part in ([] if name == "auto" else name.split("+")):
        if part.startswith("s") and part[1:].isdigit():
            out["splits"] = int(part[1:])
        elif part == "old":
            out["splits"] = -2
        elif part == "kernel":
            out["merge"] = "kernel"
        else:
            raise SystemExit(f"--attn-variants: {part!r} in {name!r} is none of sN, old, kernel")
    return out


def attention_table(args) -> list[dict]:
    """One decode-attention call (the 8B layer: 32 query / 8 KV heads, head dim 128, the whole cache attended)
    per batch and cache length, for each split-L variant (args.attn_variants) and the single-block kernel; each
    timed over distinct K / V copies in one CUDA graph (>= 160 MiB in all where memory allows: the cache read
    from HBM, as in a decode step, where 32 layers' caches exceed L2); TB/s counts the K and V bytes read."""
    from zqcompile.plugins import cuda as C
    hq, hkv, d = (4, 2, 16) if args.smoke else (32, 8, 128)
    dt = torch.float16 if args.device == "cuda" else torch.float32
    variants = [v for v in args.attn_variants.split(",") if v]
    settings = {v: attn_variant(v) for v in variants}
    rows = []
    for b in args.batches:
        for l in ([16, 32] if args.smoke else [int(x) for x in args.attn_cache_lens.split(",")]):
            kv_bytes = 2 * b * hkv * l * d * (2 if dt == torch.float16 else 4)
            copies = 1 if args.device != "cuda" else max(1, min(20, -(-(160 << 20) // kv_bytes)))
            q = torch.randn(b, hq, 1, d, device=args.device, dtype=dt)
            kvs = [tuple(torch.randn(b, hkv, l, d, device=args.device, dtype=dt) for _ in range(2))
                   for _ in range(copies)]
            mask = torch.ones(b, 1, 1, l, dtype=torch.bool, device=args.device)
            row = dict(batch=b, cache_len=l, kv_bytes=kv_bytes, copies=copies)
            ref = None

            def timed(name: str):
                with_path = C.attention_paths.copy()
                us = 1e3 * graph_ms(lambda i: torch.ops.zq.gqa_attention(q, *kvs[i], mask, d ** -0.5), copies,
                                    args.device, reps=20)
                ran = [key for key in C.attention_paths if C.attention_paths[key] != with_path.get(key, 0)]
                row[f"{name}_us"], row[f"{name}_tb_s"] = us, kv_bytes / us / 1e6
                row[f"{name}_ran"] = ",".join(sorted(ran))
                out = torch.ops.zq.gqa_attention(q, *kvs[0], mask, d ** -0.5)
                return out

            for v in variants:
                st = settings[v]
                C.decode_attention_path = "split"
                with C.switched("attention_merge", st["merge"]), attention_splits(st["splits"]):
                    out = timed("split" if v == "auto" else f"split_{v}")
                ref = out if ref is None else ref
                if v != variants[0]:  # the same attention: close to the first variant's (split counts differ)
                    row[f"split_{v}_max_diff"] = float((out.float() - ref.float()).abs().max())
            C.decode_attention_path = "single"
            timed("single")
            C.decode_attention_path = args.attention
            rows.append(row)
            print(f"  attention b{b} L{l} ({copies} copies): " + ", ".join(
                f"{k[:-3]} {row[k]:.1f} us" for k in row if k.endswith("_us")), flush=True)
    return rows


def graph_ms(fn_per_copy, copies: int, device: str, reps: int = 15) -> float:
    """Median ms of one call: on CUDA `copies` calls (each on its own operands) in one graph, replayed `reps`
    times (bench_gemm.time_graph); elsewhere the first copy's call timed eagerly."""
    if device != "cuda":
        return median_ms(lambda: fn_per_copy(0), device, 5)
    from bench.bench_gemm import time_graph
    return time_graph(fn_per_copy, copies, reps=reps)


def gemm_ms(fn, device: str) -> float:
    return graph_ms(lambda i: fn(), 20, device)  # one weight, L2 may hold part of it: an upper bound on TB/s


# ---- output ------------------------------------------------------------------------------------------------
def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict], gemms: list[dict], attn: list[dict]) -> str:
    lines = ["| shape | engine | batch | cache | decode ms/token | tokens/s | kernels/step | weight TB/s | of peak |"
             " method |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['engine']} | {r['batch']} | {r['cache_len']} | error: "
                         f"{r['error'][:80]} | | | | | |")
            continue
        lines.append(f"| {r['shape']} | {r['engine']} | {r['batch']} | {r['cache_len']} | {r['decode_ms']:.3f} | "
                     f"{fmt(r.get('tokens_per_s'), '.0f')} | {r.get('kernels_per_step', '-')} | "
                     f"{fmt(r.get('weight_read_tb_s'), '.2f')} | {fmt(r.get('peak_fraction'), '.2f')} | "
                     f"{r['method']} |")
    for name, what in (("skinny", "Decode-shaped GEMM kernel"), ("pdl", "Programmatic dependent launch"),
                       ("act_strided", "act_quant reading the gate / up halves in place"),
                       ("merge", "Split-L attention's merge of 2-8 splits (off: combine kernel, on: in the cluster)"),
                       ("attn_rule", "Split-L's split counts (off: two blocks an SM, on: the current rule)")):
        ab = [r for r in rows if f"{name}_speedup" in r]
        if ab:
            lines += ["", f"{what} A/B (same engine, same process, decode graphs re-captured; ms/token in the order "
                      "run):", "", "| shape | engine | batch | off | on | off | on | off / on |",
                      "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {r['shape']} | {r['engine']} | {r['batch']} | " + " | ".join(
                f"{r[f'decode_ms_{name}_{t}']:.3f}" for t in ("off", "on", "off2", "on2"))
                + f" | {r[f'{name}_speedup']:.2f}x |" for r in ab]
    sweeps = [r for r in rows if "prefetch_budgets" in r]
    if sweeps:
        budgets = sweeps[0]["prefetch_budgets"]
        lines += ["", "Decode GEMMs' L2 prefetch of their weight rows before the PDL wait, by budget (bytes from a "
                  "weight's start; 0 none, -1 the library's choice; same engine, same process, interleaved, two "
                  "rounds; ms/token):", "", "| shape | engine | batch | " + " | ".join(
                      f"{b} r{i}" for i in (1, 2) for b in budgets) + " |", "|---|---|---|" + "---|" * 2 * len(budgets)]
        lines += [f"| {r['shape']} | {r['engine']} | {r['batch']} | " + " | ".join(
            f"{r[f'decode_ms_prefetch_{b}_{i}']:.3f}" for i in (1, 2) for b in budgets) + " |" for r in sweeps]
    if gemms:
        lines += ["", "| K | N | M | cuBLAS fp16 us (TB/s) | INT8 us (TB/s) [kernel] | INT4 us (TB/s) [kernel] |",
                  "|---|---|---|---|---|---|"]
        for g in gemms:
            cells = [f"{g[p + '_us']:.1f} ({g[p + '_tb_s']:.2f})" + (f" [{g[p + '_kernel']}]" if p + "_kernel" in g
                                                                     else "") for p in ("fp16", "int8", "int4")]
            lines.append(f"| {g['k']} | {g['n']} | {g['m']} | " + " | ".join(cells) + " |")
    if attn:
        names = [k[:-3] for k in attn[0] if k.endswith("_us")]  # split (auto), split_<variant>..., single
        lines += ["", "Decode attention, us (K + V TB/s); split = split-L with the library's choices, split_<v> the "
                  "variant v (sN: N splits, old: the earlier two-blocks-an-SM rule, kernel: 2-8 splits merged by "
                  "the combine kernel), single = one block per (row, head):", "",
                  "| batch | cache | " + " | ".join(names) + " | paths that ran |",
                  "|---|---|" + "---|" * (len(names) + 1)]
        for a in attn:
            lines.append(f"| {a['batch']} | {a['cache_len']} | " + " | ".join(
                f"{a[n + '_us']:.1f} ({a[n + '_tb_s']:.2f})" if n + "_us" in a else "-" for n in names)
                + f" | {'; '.join(a[n + '_ran'] for n in names if n + '_ran' in a)} |")
    return "\n".join(lines)


def write(result: dict, out: Path, quiet: bool = False) -> None:
    table = markdown(result["rows"], result["gemm"], result["attention"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    if not quiet:
        print(table)
        print(f"\nwrote {out} and {out.with_suffix('.md')}")


def merge(paths: list[str], out: Path) -> int:
    parts = [json.loads(Path(p).read_text()) for p in paths]
    result = dict(parts[0], command=[r["command"] for r in parts], rows=[], gemm=[], attention=[])
    for r in parts:
        for key in ("rows", "gemm", "attention"):
            result[key] += r.get(key, [])
    write(result, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=csv(str), default=["1b", "8b"], help="comma list of 1b, 8b")
    p.add_argument("--engines", type=csv(str), default=list(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    p.add_argument("--batches", type=csv(int), default=[1, 4, 16, 64])
    p.add_argument("--cache-lens", type=csv(int), default=[128, 4096])
    p.add_argument("--new", type=int, default=64, help="N of generate(N)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--gemm", action="store_true", help="also the decode GEMM table")
    p.add_argument("--gemm-only", action="store_true", help="only the decode GEMM (and --attn) tables")
    p.add_argument("--attn", action="store_true", help="also the decode-attention table (split-L vs single block)")
    p.add_argument("--attn-only", action="store_true", help="only the decode-attention table")
    p.add_argument("--attn-variants", default="auto",
                   help="decode-attention table: split-L variants (auto, or +-joined sN / pfM / kernel: 's8+pf2')")
    p.add_argument("--attn-cache-lens", default="128,2048,4096,8192", help="decode-attention table: cache lengths")
    p.add_argument("--attention", choices=["split", "single"], default="split",
                   help="decode-attention kernel of the engines (A/B: single = one block per (row, head))")
    p.add_argument("--ab-skinny", action="store_true",
                   help="A/B per zq row: the decode-shaped GEMM kernel off and on, same engine, same process")
    p.add_argument("--ab-pdl", action="store_true",
                   help="A/B per zq row: programmatic dependent launch off and on, same engine, same process")
    p.add_argument("--ab-act-strided", action="store_true",
                   help="A/B per quantized zq row: act_quant copying the gate / up halves, then reading them in place")
    p.add_argument("--ab-merge", action="store_true",
                   help="A/B per zq row: split-L attention merging by the combine kernel, then in the cluster")
    p.add_argument("--ab-attn-rule", action="store_true",
                   help="A/B per zq row: split-L's split counts by the earlier two-blocks rule, then the current one")
    p.add_argument("--ab-prefetch", action="store_true",
                   help="per quantized zq row: the decode GEMMs' L2 weight prefetch at each of --prefetch-budgets")
    p.add_argument("--prefetch-budgets", type=csv(int), default=[0, -1],
                   help="--ab-prefetch: budgets in bytes (0 none, -1 the library's choice)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shape, reference ops (timings meaningless)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="no run: join these results (one device call "
                   "each) into --out and its markdown table")
    p.add_argument("--out", default="bench/results/decode_scale_H200.json")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out))
    bad = [e for e in args.engines if e not in ENGINES] + [s for s in args.shapes if s not in SHAPES]
    if bad:
        p.error(f"unknown engine or shape {bad}; engines: {', '.join(ENGINES)}; shapes: {', '.join(SHAPES)}")
    if args.smoke:
        args.device, args.shapes, args.new, args.repeat = "cpu", ["smoke"], 4, 1
        args.batches, args.cache_lens = [1, 2], [16, 32]
        if args.out == p.get_default("out"):
            args.out = "/tmp/decode_scale_smoke.json"  # never over the GPU results
    elif not torch.cuda.is_available():
        print("bench_decode_scale: skipped, no CUDA device (run --smoke for the CPU smoke test)")
        return 0
    else:
        args.device = "cuda"
        from zqcompile import plugins
        if not plugins.load():
            print(f"bench_decode_scale: the CUDA kernel library is not loaded ({plugins.status()}); build it first")
            return 1
        from zqcompile.plugins import cuda as C
        C.decode_attention_path = args.attention
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BYTES_PER_S.items() if k in name), None)
    result = dict(device=name, peak_bytes_per_s=peak, torch=torch.__version__,
                  transformers=__import__("transformers").__version__, command=" ".join(sys.argv),
                  attention_path=args.attention, rows=[], gemm=[], attention=[])
    if args.attn_only:
        args.gemm_only, args.attn = True, True
    if not args.gemm_only:
        for shape in args.shapes:
            model = make_model(shape, args.smoke, dtype, args.device)
            for engine in args.engines:
                bench_rows(model, shape, engine, args, peak, result["rows"],
                           save=lambda: write(result, Path(args.out), quiet=True))
            del model
            free(args.device)
    if (args.gemm or args.gemm_only or args.smoke) and not args.attn_only:
        result["gemm"] = gemm_table(args)
    if args.attn or args.smoke:
        result["attention"] = attention_table(args)
    write(result, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
