"""Does the accuracy budget's metric predict perplexity on other text? SmolLM2-135M, module-level fake-quant path
(zqcompile.accuracy.fakequant): per config, the mean next-token KL(fp32 || quantized) on the first 2,048 tokens of
Apache-2.0 (4 x 512, what `zqcompile eval --calib-text` calibrates on), its predicted perplexity increase
exp(KL) - 1, and the perplexity increase measured on the whole of GPL-3 (windows of 512). CPU.

Usage: python bench/accuracy/budget_kl_check.py [--out bench/accuracy/results/budget_kl_check.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from zqcompile.accuracy.eval import perplexity, tokenize_text
from zqcompile.accuracy.fakequant import fake_quantize
from zqcompile.cli.eval import load_for_eval
from zqcompile.config import get_config

CONFIGS = {"w8a8": ("w8a8", {}), "w8a8/16": ("w8a8/16", {}), "w8a16": ("w8a16", {}),
           "w8a8, q/k/v + down_proj FP": ("w8a8", {r"\.(q_proj|k_proj|v_proj|down_proj)$": "fp16"})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/accuracy/results/budget_kl_check.json")
    args = ap.parse_args()
    model, tok, _ = load_for_eval("smollm2")
    cal = tokenize_text(tok, Path("/usr/share/common-licenses/Apache-2.0").read_text())[:2048].view(4, 512)
    gpl = tokenize_text(tok, Path("/usr/share/common-licenses/GPL-3").read_text())
    ref = [model(c[None]).logits[0].float().log_softmax(-1) for c in cal]
    fp = perplexity(model, gpl, window=512).ppl
    rows = {}
    for name, (preset, overrides) in CONFIGS.items():
        t = time.time()
        cfg = get_config(preset).with_overrides(overrides) if overrides else get_config(preset)
        fq = fake_quantize(copy.deepcopy(model), cfg)
        kl = float(torch.cat([(r.exp() * (r - fq(c[None]).logits[0].float().log_softmax(-1))).sum(-1)
                              for c, r in zip(cal, ref)]).mean())
        ppl = perplexity(fq, gpl, window=512).ppl
        rows[name] = {"kl_apache_2048": kl, "predicted_pct": 100 * math.expm1(kl), "gpl3_ppl": ppl,
                      "measured_pct": 100 * (ppl / fp - 1), "seconds": time.time() - t}
        print(name, rows[name], flush=True)
    Path(args.out).write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "path": "fakequant", "fp32_gpl3": fp,
                                          "rows": rows, "torch": torch.__version__, "command": " ".join(sys.argv)},
                                         indent=1))


if __name__ == "__main__":
    with torch.no_grad():
        main()
