"""Issue 15's prefill grid (`python bench/bench_e2e.py --prefill`): compute-bound forwards, one row per
(model, seq, batch, engine), in priority order under a time budget, each row saved as soon as it is measured.

Engines: hf-eager-fp16 (Hugging Face eager, SDPA attention), compile-fp16 (`torch.compile(dynamic=False)`),
compile-max-autotune-fp16 (`torch.compile(mode="max-autotune", dynamic=False)`), zq-w8a8, zq-w4/8a8 and, on the
8B shape, zq-fp16 (our engine with config `none`). Models (random init, FP16; latency does not depend on the
weights' values): BERT-base and BERT-large at sequence 128 and 384, batch 1/16/128 (the BertModel forward, pooler
included); the Llama-3-8B shape (bench_decode_scale.make_model: built on the GPU in FP16) prefill of a 2048-token
prompt at batch 1 and 4: one forward without KV cache and with every position's logits (HF `use_cache=False`;
our engines compiled with `generation=False`), so both sides run the same work.
Rows {model, seq, batch, engine, ms} (+ reps, warmup_s = the first calls, compiles included, build_s = zq.compile
or torch.compile wrapper, error / skipped) go to --out (JSON, rewritten after every row: a call cut short keeps
the rows done) with a markdown table next to it: ms per engine, the ratios issue 15's targets need (W8A8 vs HF
eager, vs the best torch.compile, W4/8A8 / W8A8, W8A8 vs our FP16) and the targets, met or missed. A failure
(OOM, compile error) is recorded in its row and the run goes on; a row that does not fit the run's --budget-s or
its engine's --engine-budget-s (estimate: the engine's previous row on that model, else ASSUMED_S) is recorded
as skipped; --resume keeps the measured rows of an earlier --out and runs only the others (the next call).

Order (plan()): BERT-base s128 b128 eager, W8A8, W4/8A8, compile; the 8B prefill eager, W8A8, our FP16;
BERT-large s128 b128 eager, W8A8, W4/8A8; BERT-base s128 b128 max-autotune (the one unbounded compile, after the
targets that need nothing of it); the rest of the grid for eager and zq (~1.5 s a row); the 8B W4/8A8 (one more
8B compile); the torch.compile rows of the other shapes; the max-autotune ones.

Time estimate of the default run on an H200, cold compile caches (assumptions, none measured yet): before the
budget clock, imports and the kernel library ~15 s. BERT-base: 2 zq.compile ~8 s each, its first torch.compile
~45 s, rows ~1.5 s (-> ~70 s). 8B: built on the GPU ~10 s, zq.compile (generation=False) ~50 s each for W8A8 and
FP16 (the 8B compiles with the generation graphs took 62-93 s: decode_scale, memory_8b, streaming_8b results),
6 rows of 3 warm-ups + >= 5 repeats at ~50 / ~230 ms (b1 / b4 FP16) ~2 s each (-> ~185 s). BERT-large 2
zq.compile + 3 rows ~30 s (-> ~215 s). BERT-base max-autotune, first compile with autotuning ~150 s (-> ~365 s).
The 30 cheap rows left ~45 s (-> ~410 s). 8B W4/8A8 compile + 2 rows ~55 s (-> ~465 s). Then nothing else fits
--budget-s 470: ~8 minutes in all, the torch.compile rows of the other shapes skipped; `--resume` runs them in
the next calls (compile-fp16 ~11 x 20-45 s, max-autotune ~11 x 60-150 s: about three more calls, more than one
session's 30 device minutes leave after the first). If max-autotune takes longer, the rows after it are
budget-skipped (recorded) and --resume picks them up.

    GPU:   python bench/bench_e2e.py --prefill [--resume] [--budget-s 470] [--engines ...]
    CPU:   python bench/bench_e2e.py --prefill --smoke   (tiny shapes, reference ops, torch.compile with the eager
           backend, a simulated OOM row and budget-skipped compile rows: every code path, timings meaningless)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import zqcompile as zq  # noqa: E402
from bench.bench_decode_scale import csv, elapsed_ms, free, is_oom, make_model as make_llama, sync  # noqa: E402
from bench.bench_e2e import bench_config  # noqa: E402

LLAMA = "llama-3-8b"
BERTS = ("bert-base", "bert-large")
ENGINES = ("hf-eager-fp16", "compile-fp16", "compile-max-autotune-fp16", "zq-fp16", "zq-w8a8", "zq-w4/8a8", "zq-fp8",
           "zq-w4/8a8-fp32")
DEFAULT_ENGINES = ENGINES[:-2]  # issue 15's grid; zq-fp8 (issue 14) and fp32-scale W4 only when asked for
CHEAP = ("hf-eager-fp16", "zq-w8a8", "zq-w4/8a8")
ZQ_CONFIGS = {"zq-w8a8": "w8a8", "zq-w4/8a8": "w4/8a8", "zq-fp16": "none", "zq-fp8": "fp8",
              "zq-w4/8a8-fp32": "w4/8a8-fp32"}
COMPILE_MODES = {"compile-fp16": None, "compile-max-autotune-fp16": "max-autotune"}
BERT_SHAPES = {"bert-base": dict(), "bert-large": dict(hidden_size=1024, num_hidden_layers=24,
                                                      num_attention_heads=16, intermediate_size=4096)}
SMOKE_BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=1000)
# Assumed H200 cost (s) of an engine's first row on a model before anything is measured: zq.compile + the row, or
# torch.compile's first compile at a shape + the row. Later rows assume the engine's previous row on that model.
ASSUMED_S = {("zq", "bert-base"): 10, ("zq", "bert-large"): 15, ("zq", LLAMA): 55,
             "compile-fp16": 45, "compile-max-autotune-fp16": 150, "hf-eager-fp16": 3}
ENGINE_BUDGET_S = {"compile-fp16": 150, "compile-max-autotune-fp16": 200}
TARGETS_DOC = ("issue 15: BERT-base s128 b128 W8A8 <= 2.6 ms, >= 2.8x HF eager, >= 2x the best torch.compile; "
               "BERT-large same shape >= 2.5x HF eager; W4/8A8 <= 1.15x W8A8 everywhere; 8B prefill W8A8 >= 1.6x "
               "our FP16; batch 1: W8A8 no slower than the fastest FP16")


def plan(models: list[str], seqs: list[int], batches: list[int], llama_seq: int, llama_batches: list[int],
         engines: list[str]) -> list[tuple]:
    """(model, seq, batch, engine) rows, most important first (module docstring); `engines` filters."""
    berts = [m for m in models if m in BERTS]
    head = (seqs[0], max(batches))
    llama = LLAMA in models

    def bert_rows(m, shapes, engs):
        return [(m, s, b, e) for (s, b) in shapes for e in engs] if m in berts else []
    rest = [(s, b) for s in seqs for b in batches if (s, b) != head]
    rows = bert_rows(berts[0] if berts else None, [head], CHEAP + ("compile-fp16",))
    if llama:
        rows += [(LLAMA, llama_seq, b, e) for e in ("hf-eager-fp16", "zq-w8a8", "zq-fp16") for b in llama_batches]
    for m in berts[1:]:
        rows += bert_rows(m, [head], CHEAP)
    rows += bert_rows(berts[0] if berts else None, [head], ("compile-max-autotune-fp16",))
    for m in berts:
        rows += bert_rows(m, rest, CHEAP)
    if llama:
        rows += [(LLAMA, llama_seq, b, "zq-w4/8a8") for b in llama_batches]
    for e in COMPILE_MODES:
        for m in berts[1:]:
            rows += bert_rows(m, [head], (e,))
        for m in berts:
            rows += bert_rows(m, rest, (e,))
    for m in berts:  # the FP8 engine (issue 14), only when asked for: the head shape first
        rows += bert_rows(m, [head] + rest, ("zq-fp8",))
    if llama:
        rows += [(LLAMA, llama_seq, b, "zq-fp8") for b in llama_batches]
    for m in berts:  # W4/8A8 with fp32 INT4 K-group scales (before stop 36), only when asked for
        rows += bert_rows(m, [head] + rest, ("zq-w4/8a8-fp32",))
    if llama:
        rows += [(LLAMA, llama_seq, b, "zq-w4/8a8-fp32") for b in llama_batches]
    return [r for r in dict.fromkeys(rows) if r[3] in engines]


# ---- running ---------------------------------------------------------------------------------------------
class Grid:
    """Models and engines of the rows still to run (each freed after its last row), and time spent per engine."""

    def __init__(self, args):
        self.args, self.models, self.engines, self.failed = args, {}, {}, {}
        self.spent, self.last_cost = {}, {}
        self.t0 = time.perf_counter()

    def model(self, name: str):
        if name not in self.models:
            a = self.args
            if name == LLAMA:
                m = make_llama("smoke" if a.smoke else "8b", a.smoke, a.dtype, a.device)
            else:
                import transformers as T
                torch.manual_seed(0)
                with torch.device(a.device):
                    m = T.BertModel(T.BertConfig(**(SMOKE_BERT if a.smoke else BERT_SHAPES[name])))
                m = m.eval().to(a.dtype)
            self.models[name] = m
        return self.models[name]

    def engine(self, m: str, e: str):
        """A callable ids -> output for engine `e` on model `m` (built once), and its build seconds (0 if built)."""
        if (m, e) in self.engines:
            return self.engines[(m, e)], 0.0
        model, t0 = self.model(m), time.perf_counter()
        kw = {"use_cache": False} if m == LLAMA else {}
        if e == "hf-eager-fp16":
            fn = lambda ids: model(ids, **kw)  # noqa: E731
        elif e in COMPILE_MODES:
            opts = dict(backend="eager") if self.args.smoke else dict(mode=COMPILE_MODES[e])
            compiled = torch.compile(model, dynamic=False, **opts)
            fn = lambda ids: compiled(ids, **kw)  # noqa: E731
        else:
            ids0 = torch.randint(3, min(1000, model.config.vocab_size), (2, 64), device=self.args.device)
            fn = zq.compile(model, (ids0,), bench_config(ZQ_CONFIGS[e]), generation=False)
        self.engines[(m, e)] = fn
        return fn, time.perf_counter() - t0

    def estimate_s(self, m: str, e: str) -> float:
        if self.args.smoke:
            return 0.0
        if (m, e) in self.last_cost:
            return self.last_cost[(m, e)]
        return ASSUMED_S[("zq", m)] if e in ZQ_CONFIGS else ASSUMED_S[e]

    def skip_reason(self, m: str, e: str) -> str | None:
        est, a = self.estimate_s(m, e), self.args
        left = a.budget_s - (time.perf_counter() - self.t0)
        if est > left:
            return f"run budget: ~{est:.0f} s estimated, {max(left, 0):.0f} s of --budget-s {a.budget_s:g} left"
        cap = a.engine_budget_s.get(e, math.inf)
        if self.spent.get(e, 0.0) + est > cap:
            return f"engine budget: {e} spent {self.spent.get(e, 0.0):.0f} s of {cap:g} s (--engine-budget-s)"
        return None

    def run(self, task: tuple) -> dict:
        m, s, b, e = task
        row = dict(model=m, seq=s, batch=b, engine=e, ms=None)
        if (m, e) in self.failed:
            return dict(row, error=f"engine not built: {self.failed[(m, e)]}")
        why = self.skip_reason(m, e)
        if why:
            return dict(row, skipped=why)
        t0 = time.perf_counter()
        try:
            if f"{m}:{e}" in self.args.simulate_oom:
                raise torch.OutOfMemoryError("simulated (--simulate-oom, at the build)")
            fn, row["build_s"] = self.engine(m, e)
            if e not in ZQ_CONFIGS:
                row["attn"] = self.models[m].config._attn_implementation
        except Exception as err:  # noqa: BLE001 - recorded in the row, the run goes on
            self.failed[(m, e)] = f"{type(err).__name__}: {str(err)[:300]}"
            row["error"], row["oom"] = self.failed[(m, e)], is_oom(err)
            self.engines.pop((m, e), None)
        else:
            try:
                if f"{m}:{e}:{b}" in self.args.simulate_oom:
                    raise torch.OutOfMemoryError("simulated (--simulate-oom, at the timed calls)")
                model = self.models[m]
                ids = torch.randint(3, min(1000, model.config.vocab_size), (b, s), device=self.args.device)
                row.update(measure(fn, ids, self.args))
            except Exception as err:  # noqa: BLE001
                row["error"], row["oom"] = f"{type(err).__name__}: {str(err)[:300]}", is_oom(err)
        if "error" in row:  # here, not in the except block: the exception's frames hold the failed call's tensors
            free(self.args.device)
        cost = time.perf_counter() - t0
        self.spent[e] = self.spent.get(e, 0.0) + cost
        self.last_cost[(m, e)] = cost - row.get("build_s", 0.0)
        return row

    def release(self, remaining: list[tuple]) -> None:
        """Free the engines and models no remaining row needs (the 8B model and its engines before BERT-large's
        compile rows)."""
        need = {(m, e) for m, _, _, e in remaining}
        engines = [k for k in self.engines if k not in need]
        models = [n for n in self.models if n not in {m for m, _ in need}]
        for key in engines:
            del self.engines[key]
        for name in models:
            del self.models[name]
        if engines or models:
            free(self.args.device)


def measure(fn, ids, args) -> dict:
    """ms = median of CUDA-event-timed calls after args.warmups calls (compiles, CUDA-graph captures); repeats
    chosen so the timed calls take about args.row_s (between 5 and args.reps; smoke: 1)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(args.warmups):
            fn(ids)
        sync(args.device)
        warm = time.perf_counter() - t0
        first = elapsed_ms(lambda: fn(ids), args.device)
        reps = 1 if args.smoke else max(5, min(args.reps, int(args.row_s * 1e3 / max(first, 1e-3))))
        times = [first] + [elapsed_ms(lambda: fn(ids), args.device) for _ in range(reps - 1)]
    return dict(ms=statistics.median(times), reps=reps, warmup_s=warm)


# ---- ratios, targets, output -----------------------------------------------------------------------------
def by_shape(rows: list[dict]) -> dict[tuple, dict[str, float]]:
    """(model, seq, batch) -> {engine: ms} of the measured rows, in the order they were measured."""
    out: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.get("ms") is not None:
            out.setdefault((r["model"], r["seq"], r["batch"]), {})[r["engine"]] = r["ms"]
    return out


def ratios(rows: list[dict]) -> list[dict]:
    """Per shape: HF eager / W8A8, best torch.compile / W8A8, W4/8A8 / W8A8, our FP16 / W8A8 (where measured)."""
    out = []
    for (m, s, b), ms in by_shape(rows).items():
        w8 = ms.get("zq-w8a8")
        compiled = {e: ms[e] for e in COMPILE_MODES if e in ms}
        best = min(compiled, key=compiled.get) if compiled else None
        r = dict(model=m, seq=s, batch=b, w8a8_ms=w8, best_compile=best,
                 w8a8_vs_hf_eager=ms["hf-eager-fp16"] / w8 if w8 and "hf-eager-fp16" in ms else None,
                 w8a8_vs_best_compile=compiled[best] / w8 if w8 and best else None,
                 w4_over_w8a8=ms["zq-w4/8a8"] / w8 if w8 and "zq-w4/8a8" in ms else None,
                 w4_fp32_over_w8a8=ms["zq-w4/8a8-fp32"] / w8 if w8 and "zq-w4/8a8-fp32" in ms else None,
                 w8a8_vs_zq_fp16=ms["zq-fp16"] / w8 if w8 and "zq-fp16" in ms else None)
        fp16 = [ms[e] for e in ENGINES if e in ms and e.endswith("fp16")]
        r["w8a8_vs_fastest_fp16"] = min(fp16) / w8 if w8 and fp16 else None
        out.append(r)
    return out


def targets(rat: list[dict], head: tuple, llama_seq: int) -> list[dict]:
    """Issue 15's targets on the measured ratios: name, value, bound, met (None: not measured)."""
    at = {(r["model"], r["seq"], r["batch"]): r for r in rat}
    out = []

    def add(name, value, bound, at_most=False):
        met = None if value is None else (value <= bound if at_most else value >= bound)
        out.append(dict(target=name, value=value, bound=bound, met=met))
    base, large = at.get(("bert-base", *head), {}), at.get(("bert-large", *head), {})
    add(f"bert-base s{head[0]} b{head[1]} W8A8 ms", base.get("w8a8_ms"), 2.6, at_most=True)
    add(f"bert-base s{head[0]} b{head[1]} W8A8 vs HF eager", base.get("w8a8_vs_hf_eager"), 2.8)
    add(f"bert-base s{head[0]} b{head[1]} W8A8 vs best torch.compile", base.get("w8a8_vs_best_compile"), 2.0)
    add(f"bert-large s{head[0]} b{head[1]} W8A8 vs HF eager", large.get("w8a8_vs_hf_eager"), 2.5)
    for r in rat:
        shape = f"{r['model']} s{r['seq']} b{r['batch']}"
        if r["w4_over_w8a8"] is not None:
            add(f"{shape} W4/8A8 / W8A8", r["w4_over_w8a8"], 1.15, at_most=True)
        if r.get("w4_fp32_over_w8a8") is not None:
            add(f"{shape} W4/8A8 fp32 scales / W8A8", r["w4_fp32_over_w8a8"], 1.15, at_most=True)
        if r["model"] == LLAMA and r["seq"] == llama_seq:
            add(f"{shape} W8A8 vs our FP16", r["w8a8_vs_zq_fp16"], 1.6)
        if r["batch"] == 1:
            add(f"{shape} W8A8 vs the fastest FP16", r["w8a8_vs_fastest_fp16"], 1.0)
    return out


def cell(v, spec=".2f", suffix="") -> str:
    return "-" if v is None else format(v, spec) + suffix


def markdown(result: dict) -> str:
    rows = result["rows"]
    engines = [e for e in ENGINES if any(r["engine"] == e for r in rows)]
    status = {}
    for r in rows:
        status[(r["model"], r["seq"], r["batch"], r["engine"])] = (
            f"{r['ms']:.2f}" if r.get("ms") is not None else "fail" if "error" in r else "skip")
    calls = sorted({r["call"] for r in rows if "call" in r})
    measured = sum(r.get("ms") is not None for r in rows)
    out = [f"Device: {result['device']}; zq CUDA kernels loaded: {result['zq_cuda_kernels']}; ms, median of timed "
           f"calls (CUDA events on the GPU); {measured} of {len(rows)} rows measured, in {len(calls)} call(s) "
           f"({', '.join(calls)}); fail / skip: the JSON row says why. {TARGETS_DOC}.", "",
           "| model | seq | batch | " + " | ".join(engines) + " | W8A8 vs HF eager | vs best compile | "
           "W4/8A8 / W8A8 | W8A8 vs zq-fp16 |", "|---" * (len(engines) + 7) + "|"]
    for r in result["ratios"] + [dict(model=m, seq=s, batch=b) for (m, s, b) in dict.fromkeys(
            (r["model"], r["seq"], r["batch"]) for r in rows) if (m, s, b) not in
            {(x["model"], x["seq"], x["batch"]) for x in result["ratios"]}]:
        key = (r["model"], r["seq"], r["batch"])
        cells = [status.get(key + (e,), "-") for e in engines]
        cells += [cell(r.get(k), suffix="x") for k in ("w8a8_vs_hf_eager", "w8a8_vs_best_compile")]
        cells += [cell(r.get("w4_over_w8a8")), cell(r.get("w8a8_vs_zq_fp16"), suffix="x")]
        out.append(f"| {r['model']} | {r['seq']} | {r['batch']} | " + " | ".join(cells) + " |")
    out += ["", "| target | measured | bound | met |", "|---|---|---|---|"]
    out += [f"| {t['target']} | {cell(t['value'])} | {t['bound']:g} | "
            f"{'-' if t['met'] is None else 'yes' if t['met'] else 'MISSED'} |" for t in result["targets"]]
    bad = [r for r in rows if r.get("ms") is None]
    if bad:
        out += ["", "Not measured:"] + [f"- {r['model']} s{r['seq']} b{r['batch']} {r['engine']}: "
                                        f"{r.get('error') or r.get('skipped')}" for r in bad]
    return "\n".join(out)


def save(result: dict, out: Path, quiet: bool = True) -> None:
    """JSON and markdown, each written to a temporary file and renamed (a call killed mid-write keeps the last)."""
    a = result["args"]
    result["ratios"] = ratios(result["rows"])
    result["targets"] = targets(result["ratios"], (a["seqs"][0], max(a["batches"])), a["llama_seq"])
    table = markdown(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(result, indent=1)), (out.with_suffix(".md"), table + "\n")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    if not quiet:
        print(table)
        print(f"\nwrote {out} and {out.with_suffix('.md')}")


def raise_recompile_limits() -> None:
    """Every (model, shape, mode) of torch.compile is its own dynamo entry of the same forward: past the limit
    (8) dynamo silently runs eager and a compile row would time HF eager; raise it, and fail loudly past it."""
    for name, value in (("recompile_limit", 256), ("accumulated_recompile_limit", 4096),
                        ("fail_on_recompile_limit_hit", True)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, value)


def budgets(spec: str) -> dict[str, float]:
    """'compile-fp16=150,compile-max-autotune-fp16=0' -> seconds per engine (0: skip that engine)."""
    out = dict(ENGINE_BUDGET_S)
    for item in filter(None, spec.split(",")):
        name, _, secs = item.partition("=")
        try:
            out[name] = float(secs)
        except ValueError:
            name = None
        if name not in ENGINES:
            raise argparse.ArgumentTypeError(f"{item!r} is not ENGINE=SECONDS, ENGINE one of {', '.join(ENGINES)}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_e2e.py --prefill", description=__doc__.splitlines()[0])
    p.add_argument("--models", type=csv(str), default=[*BERTS, LLAMA],
                   help=f"comma list of {', '.join(BERTS)}, {LLAMA}")
    p.add_argument("--engines", type=csv(str), default=list(DEFAULT_ENGINES),
                   help=f"comma list of {', '.join(ENGINES)} (default: all but zq-fp8)")
    p.add_argument("--seqs", type=csv(int), default=[128, 384], help="BERT sequence lengths (the first is the head)")
    p.add_argument("--batches", type=csv(int), default=[1, 16, 128], help="BERT batches (the largest is the head)")
    p.add_argument("--llama-seq", type=int, default=2048)
    p.add_argument("--llama-batches", type=csv(int), default=[1, 4])
    p.add_argument("--budget-s", type=float, default=470, help="seconds from the first row: no row starts that is "
                   "estimated to end past this")
    p.add_argument("--engine-budget-s", type=budgets, default=None,
                   help="ENGINE=SECONDS,...: an engine's rows stop once it has spent this (0 skips it); default "
                        + ",".join(f"{k}={v:g}" for k, v in ENGINE_BUDGET_S.items()))
    p.add_argument("--reps", type=int, default=30, help="most timed calls a row")
    p.add_argument("--row-s", type=float, default=1.0, help="timed calls a row: about this many seconds")
    p.add_argument("--warmups", type=int, default=3)
    p.add_argument("--resume", action="store_true", help="keep --out's measured rows, run only the others")
    p.add_argument("--simulate-oom", action="append", default=None, metavar="MODEL:ENGINE[:BATCH]",
                   help="test hook: that engine's build on that model (or its timed calls at BATCH) raises "
                        "torch.OutOfMemoryError (--smoke does two; `none`: no simulated OOM)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, reference ops (timings meaningless)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "prefill_H200.json"))
    args = p.parse_args(argv)
    bad = [e for e in args.engines if e not in ENGINES] + [m for m in args.models if m not in (*BERTS, LLAMA)]
    if bad:
        p.error(f"unknown engine or model {bad}; engines: {', '.join(ENGINES)}; models: {', '.join(BERTS)}, {LLAMA}")
    have_kernels = False
    if args.smoke:
        args.device, args.dtype, args.warmups = "cpu", torch.float32, 1
        args.seqs, args.batches, args.llama_seq, args.llama_batches = [16], [1, 2], 32, [1, 2]
        if "bert-large" in args.models:  # the same code path as bert-base: one tiny BERT keeps the smoke short
            args.models = [m for m in args.models if m != "bert-large"]
        if args.engine_budget_s is None:
            args.engine_budget_s = dict.fromkeys(COMPILE_MODES, 1e-9)  # one row each, the rest budget-skipped
        if args.simulate_oom is None:  # both failure paths, no engine built for nothing
            args.simulate_oom = [f"{LLAMA}:zq-w4/8a8", f"{LLAMA}:hf-eager-fp16:{args.llama_batches[-1]}"]
        if args.out == p.get_default("out"):
            args.out = "/tmp/prefill_smoke.json"  # never over the GPU results
    elif not torch.cuda.is_available():
        print("bench_e2e --prefill: no CUDA device (run --smoke for the CPU smoke test)")
        return 1
    else:
        from zqcompile import plugins
        args.device, args.dtype = "cuda", torch.float16
        have_kernels = plugins.load()
        if not have_kernels:
            print(f"bench_e2e --prefill: the CUDA kernel library is not loaded ({plugins.status()}); build it first")
            return 1
        torch.backends.cuda.matmul.allow_tf32 = False
    if args.engine_budget_s is None:
        args.engine_budget_s = dict(ENGINE_BUDGET_S)
    args.simulate_oom = args.simulate_oom or []
    raise_recompile_limits()
    out = Path(args.out)
    import transformers
    result = dict(bench="prefill", issue=15, smoke=args.smoke,
                  device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                  zq_cuda_kernels=have_kernels, versions=dict(torch=torch.__version__, python=platform.python_version(),
                                                              transformers=transformers.__version__),
                  command=" ".join(sys.argv if argv is None else ["bench/bench_e2e.py", "--prefill", *argv]),
                  time=time.strftime("%Y-%m-%d %H:%M:%S"),
                  args=dict(seqs=args.seqs, batches=args.batches, llama_seq=args.llama_seq,
                            llama_batches=args.llama_batches, budget_s=args.budget_s,
                            engine_budget_s=args.engine_budget_s), rows=[])
    tasks = plan(args.models, args.seqs, args.batches, args.llama_seq, args.llama_batches, args.engines)
    if args.resume and out.exists():
        kept = [r for r in json.loads(out.read_text())["rows"] if r.get("ms") is not None]
        done = {(r["model"], r["seq"], r["batch"], r["engine"]) for r in kept}
        result["rows"], tasks = kept, [t for t in tasks if t not in done]
        result["resumed_rows"] = len(kept)
    grid = Grid(args)
    for i, task in enumerate(tasks):
        row = grid.run(task)
        row["call"] = result["time"]
        result["rows"].append(row)
        result["elapsed_s"] = time.perf_counter() - grid.t0
        save(result, out)
        msg = f"{row['ms']:.3f} ms" if row.get("ms") is not None else row.get("error") or row.get("skipped")
        print(f"[{result['elapsed_s']:6.1f} s] {task[0]} s{task[1]} b{task[2]} {task[3]}: {msg}", flush=True)
        grid.release(tasks[i + 1:])
    save(result, out, quiet=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
