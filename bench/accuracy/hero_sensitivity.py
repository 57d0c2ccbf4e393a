"""Which GEMMs cost W8A8 its accuracy on SmolLM2-135M, and what ZeroQuant-HERO's FP16 switch buys back:
perplexity (fake-quant path, GPL-3, windows of 512, as bench/accuracy/run.py) of w8a8 with one group of GEMMs
kept in floating point at a time: each role (qkv, attn_out, fc1 = gate/up, fc2 = down) across all layers,
then the two best roles together and the w8a8/16 preset (HERO's FP16 attention input), then each layer's GEMMs
(--layers) and the two best layers together.

    python bench/accuracy/hero_sensitivity.py [--layers] [--out bench/accuracy/results/hero_sensitivity.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from zqcompile.config import get_config  # noqa: E402
from zqcompile.accuracy.eval import perplexity, tokenize_text  # noqa: E402
from zqcompile.cli.eval import load_for_eval  # noqa: E402
from zqcompile.accuracy.fakequant import fake_quantize  # noqa: E402

ROLE_PATTERNS = {"qkv": r"\.(q_proj|k_proj|v_proj)$", "attn_out": r"\.o_proj$", "fc1": r"\.(gate_proj|up_proj)$",
                 "fc2": r"\.down_proj$"}


def ppl(model, ids, overrides: dict[str, str], window: int, preset: str = "w8a8") -> float:
    cfg = get_config(preset).with_overrides(overrides) if overrides else get_config(preset)
    fq = fake_quantize(copy.deepcopy(model), cfg)
    with torch.no_grad():
        return perplexity(fq, ids, window=window).ppl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", action="store_true", help="also one row per layer (30 more evaluations)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "bench/accuracy/results/hero_sensitivity.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok, _ = load_for_eval("smollm2")
    ids = tokenize_text(tok, open("/usr/share/common-licenses/GPL-3").read())
    with torch.no_grad():
        fp32 = perplexity(model, ids, window=args.window).ppl
    rows = {"fp32": fp32, "w8a8": ppl(model, ids, {}, args.window)}
    print(rows, flush=True)
    for role, pat in ROLE_PATTERNS.items():
        rows[f"w8a8, {role} FP"] = ppl(model, ids, {pat: "fp16"}, args.window)
        print(role, rows[f"w8a8, {role} FP"], flush=True)
    best = sorted(ROLE_PATTERNS, key=lambda r: rows[f"w8a8, {r} FP"])[:2]
    rows[f"w8a8, {' + '.join(best)} FP"] = ppl(model, ids, {ROLE_PATTERNS[r]: "fp16" for r in best}, args.window)
    rows["w8a8/16 (HERO: QKV input FP, INT8 weights)"] = ppl(model, ids, {}, args.window, preset="w8a8/16")
    print(rows, flush=True)
    layer_rows = {}
    if args.layers:
        for i in range(model.config.num_hidden_layers):
            layer_rows[i] = ppl(model, ids, {rf"\.layers\.{i}\.": "fp16"}, args.window)
            print("layer", i, layer_rows[i], flush=True)
        worst = sorted(layer_rows, key=layer_rows.get)[:2]
        rows[f"w8a8, layers {worst} FP"] = ppl(model, ids, {rf"\.layers\.({'|'.join(map(str, worst))})\.": "fp16"},
                                               args.window)
    gap = rows["w8a8"] - fp32
    result = {"model": "SmolLM2-135M-Instruct", "text": "GPL-3", "window": args.window, "path": "fakequant",
              "fp16 means": "the GEMM kept in the model's float dtype (fp32 on CPU)", "rows": rows,
              "per_layer": layer_rows,
              "gap_recovered": {k: (rows["w8a8"] - v) / gap for k, v in rows.items() if k.startswith("w8a8")},
              "command": " ".join(sys.argv), "seconds": time.process_time()}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
