"""End-to-end GPU latency: zqcompile W8A8 / W4/8A8 engines vs FP16 baselines, in one run on one GPU.

Baselines: Hugging Face eager FP16, `torch.compile` FP16 (dynamic=False), torchao W8A8 dynamic
(`Int8DynamicActivationInt8WeightConfig` + compile) where torchao is importable and the shape runs.
Models (random init; latency does not depend on the weights' values): BERT-base and BERT-large shapes
(the paper's Table 6 grid), and a GPT-2-medium-shaped (350M, the paper's GPT-3-350M shape) prefill.
Medians over CUDA-event-timed repeats; prints a markdown table and writes JSON (device, versions, command).
--max-autotune adds `torch.compile(mode="max-autotune")` FP16 where torch.compile is timed (minutes of autotuning
per shape).

    python bench/bench_e2e.py --out bench/results/e2e.json [--quick] [--max-autotune]

A config name ending in "-fp32" (e.g. "w4/8a8-fp32") is that preset with fp32 INT4 K-group scales instead of
two-level ones (the K-group kernels at every M), see bench_config.

Issue 15's prefill grid (rows {model, seq, batch, engine, ms}, priority order, time budget, the 8B prefill):
    python bench/bench_e2e.py --prefill [--smoke] ...     (bench/e2e_prefill.py says what it runs)
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import zqcompile as zq  # noqa: E402
from zqcompile.passes.base import get_tensor  # noqa: E402


def bench_config(name: str):
    """A preset name, or one ending in "-fp32": that preset with its INT4 K-group scales fp32, not two-level
    (the W4/8A8 preset before stop 36: the K-group kernels at every M, for A/B runs)."""
    from dataclasses import replace
    if not name.endswith("-fp32"):
        return zq.config.get_config(name)
    cfg = zq.config.get_config(name[:-5])

    def fp32(s):
        w = s.weight
        return s if w is None or w.group_scales != "two-level" else replace(s, weight=replace(w, group_scales="fp32"))
    return replace(cfg, name=name, default=fp32(cfg.default), roles={r: fp32(s) for r, s in cfg.roles.items()},
                   overrides=tuple((k, fp32(s) if isinstance(s, zq.config.GemmScheme) else s)
                                   for k, s in cfg.overrides))


def make_model(name: str):
    import transformers as T
    if name == "bert-base":
        return T.BertModel(T.BertConfig())
    if name == "bert-large":
        return T.BertModel(T.BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                        intermediate_size=4096))
    if name == "gpt2-medium":
        return T.GPT2LMHeadModel(T.GPT2Config(n_embd=1024, n_layer=24, n_head=16))
    if name == "smollm2":  # SmolLM2-135M's shape (LLaMA: GQA 9/3 heads, SiLU-gated MLP, tied embeddings)
        return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                                num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                                max_position_embeddings=2048, tie_word_embeddings=True))
    raise SystemExit(f"unknown model {name}")


def time_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def gemm_weight_bytes(model) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2
               and type(m).__name__ in ("Linear", "Conv1D"))


def engine_gemm_bytes(engine) -> int:
    total = 0
    for node in engine.gm.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.zq.int8_gemm_dequant.default,
                                                          torch.ops.zq.weight_only_gemm.default):
            idx = (2, 3) if node.target == torch.ops.zq.int8_gemm_dequant.default else (1, 2)
            for i in idx:
                t = get_tensor(engine.gm, node.args[i])
                total += t.numel() * t.element_size()
        elif node.op == "call_function" and node.target == torch.ops.aten.linear.default and "zq_gemm" in node.meta:
            w = get_tensor(engine.gm, node.args[1])  # None when the weight is cast first (fp16/bf16 switch)
            if w is not None:
                total += w.numel() * w.element_size()
    return total


def main() -> None:
    if "--prefill" in sys.argv[1:]:
        from bench.e2e_prefill import main as prefill
        sys.exit(prefill([a for a in sys.argv[1:] if a != "--prefill"]))
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="bert-base,bert-large,gpt2-medium")
    ap.add_argument("--batches", default="1,4,16,64,128")
    ap.add_argument("--seqs", default="128,256")
    ap.add_argument("--compile-batches", default="1,16,128", help="where torch.compile / torchao are timed")
    ap.add_argument("--causal-batches", default="1,8,32", type=lambda v: [int(b) for b in v.split(",")],
                    help="prefill batches for the causal LMs (prompt 128)")
    ap.add_argument("--torchao-batches", default="128", help="torchao int8 GEMM needs M > 16 (docs/facts.md)")
    ap.add_argument("--configs", default="w8a8,w4/8a8")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="bert-base seq 128 only")
    ap.add_argument("--max-autotune", action="store_true", help='also torch.compile(mode="max-autotune") FP16')
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "e2e.json"))
    args = ap.parse_args()
    from zqcompile import plugins
    have_kernels = plugins.load()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    models = ["bert-base"] if args.quick else args.models.split(",")
    seqs = [128] if args.quick else [int(s) for s in args.seqs.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    compile_batches = {int(b) for b in args.compile_batches.split(",")}
    torchao_batches = {int(b) for b in args.torchao_batches.split(",")}
    try:
        import torchao
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        why_no_torchao = None
    except Exception as e:  # noqa: BLE001
        torchao, why_no_torchao = None, f"{type(e).__name__}: {e}"
    rows, memory = [], []
    for name in models:
        torch.manual_seed(0)
        model = make_model(name).eval().half().to(dev)
        causal = name in ("gpt2-medium", "smollm2")
        seq_list = [128] if causal else seqs
        ids0 = torch.randint(0, 1000, (2, 128), device=dev)
        t0 = time.perf_counter()
        engines = {c: zq.compile(model, (ids0,), bench_config(c)) for c in args.configs.split(",")}
        print(f"# {name}: zq.compile x{len(engines)} in {time.perf_counter() - t0:.1f} s", flush=True)
        fp_gemm = gemm_weight_bytes(model)
        fp_all = sum(p.numel() * p.element_size() for p in model.parameters())
        check = torch.randint(0, 1000, (4, 128), device=dev)
        with torch.no_grad():
            ref = model(check, **({"use_cache": False} if causal else {}))
            ref = (ref.logits if hasattr(ref, "logits") else ref.last_hidden_state).float()
        for c, e in engines.items():
            out = e(check)
            out = (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()
            memory.append(dict(model=name, config=c, gemm_weight_ratio=engine_gemm_bytes(e) / fp_gemm,
                               all_weight_ratio=e.weight_bytes() / fp_all,
                               rel_l2_err_vs_fp16=float((out - ref).norm() / ref.norm())))
        if args.max_autotune:
            from bench.e2e_prefill import raise_recompile_limits
            raise_recompile_limits()
        compiled = torch.compile(model, dynamic=False)
        autotuned = torch.compile(model, dynamic=False, mode="max-autotune") if args.max_autotune else None
        ao = None
        if torchao is not None:
            import copy
            ao_model = copy.deepcopy(model)
            quantize_(ao_model, Int8DynamicActivationInt8WeightConfig())
            ao = torch.compile(ao_model, dynamic=False)
        for seq in seq_list:
            for bs in (args.causal_batches if causal else batches):
                ids = torch.randint(0, 1000, (bs, seq), device=dev)
                kw = {"use_cache": False} if causal else {}
                row = dict(model=name, seq=seq, batch=bs)
                with torch.no_grad():
                    row["hf_eager_fp16"] = time_ms(lambda: model(ids, **kw), args.reps)
                    if bs in compile_batches:
                        row["torch_compile_fp16"] = time_ms(lambda: compiled(ids, **kw), args.reps)
                        if autotuned is not None:
                            row["torch_compile_max_autotune_fp16"] = time_ms(lambda: autotuned(ids, **kw), args.reps)
                        if ao is not None and bs in torchao_batches:
                            try:
                                row["torchao_w8a8"] = time_ms(lambda: ao(ids, **kw), args.reps)
                            except Exception as e:  # noqa: BLE001 - reported, not hidden
                                row["torchao_w8a8_error"] = f"{type(e).__name__}: {str(e)[:120]}"
                    for c, e in engines.items():
                        row[f"zq_{c}"] = time_ms(lambda: e(ids), args.reps)
                rows.append(row)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        model = compiled = autotuned = ao = engines = None  # frees them (the timing lambdas close over the names)
        torch.cuda.empty_cache()
        save(args, rows, memory, have_kernels, torchao, why_no_torchao if torchao is None else None)


def save(args, rows, memory, have_kernels, torchao, why_no_torchao) -> None:
    """Write JSON + markdown after every model, so a run cut short keeps what it measured."""
    paths = None
    try:
        from zqcompile.plugins import cuda_gemm
        paths = dict(cuda_gemm.served)  # kernel -> GEMM calls it served (eager calls and CUDA-graph captures)
    except Exception:  # noqa: BLE001 - library not loaded
        pass
    result = dict(bench="e2e", device=torch.cuda.get_device_name(), zq_cuda_kernels=have_kernels,
                  versions=dict(torch=torch.__version__, python=platform.python_version(),
                                torchao=getattr(torchao, "__version__", None) if torchao else None),
                  torchao_unavailable=why_no_torchao, zq_gemm_paths=paths,
                  command=" ".join(sys.argv), time=time.strftime("%Y-%m-%d %H:%M:%S"), rows=rows, memory=memory)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(markdown(result))
    Path(args.out).with_suffix(".md").write_text(markdown(result) + "\n")


def markdown(result: dict) -> str:
    cols = ["hf_eager_fp16", "torch_compile_fp16", "torch_compile_max_autotune_fp16", "torchao_w8a8"] + sorted(
        {k for r in result["rows"] for k in r if k.startswith("zq_")})
    out = [f"Device: {result['device']}; zq CUDA kernels loaded: {result['zq_cuda_kernels']}; "
           f"ms, median of repeats; speed-up columns = baseline / zq w8a8", "",
           "| model | seq | batch | " + " | ".join(cols) + " | vs eager | vs compile | vs torchao |",
           "|---" * (len(cols) + 6) + "|"]
    for r in result["rows"]:
        ours = r.get("zq_w8a8")
        cells = [f"{r[c]:.2f}" if c in r else ("fail" if c + "_error" in r else "-") for c in cols]
        ratios = [f"{r[b] / ours:.2f}x" if ours and b in r else "-"
                  for b in ("hf_eager_fp16", "torch_compile_fp16", "torchao_w8a8")]
        out.append(f"| {r['model']} | {r['seq']} | {r['batch']} | " + " | ".join(cells + ratios) + " |")
    out += ["", "| model | config | GEMM weight bytes vs FP16 | all constants vs FP16 | rel L2 err vs HF FP16 |",
            "|---|---|---|---|---|"]
    out += [f"| {m['model']} | {m['config']} | {m['gemm_weight_ratio']:.3f} | {m['all_weight_ratio']:.3f} | "
            f"{m['rel_l2_err_vs_fp16']:.4f} |" for m in result["memory"]]
    return "\n".join(out)


if __name__ == "__main__":
    main()
