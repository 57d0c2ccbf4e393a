"""Which GEMMs cost all-MiniLM-L6-v2 its W8A8 accuracy on short padded sentences (bench/accuracy/minilm_short.py's
eight, with their attention mask): least cosine of the mean-pooled embeddings vs fp32 with one GEMM alone 8-bit
(the rest float) and with one GEMM alone kept in float (the rest W8A8), then per role; and whether padding or the
weights are the cause ("Thanks." alone, unpadded; every GEMM W8A16). Fake-quant path (module level), CPU.

Usage: python bench/accuracy/minilm_sensitivity.py [--out bench/accuracy/results/minilm_sensitivity.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_short import SENTENCES  # noqa: E402

from zqcompile.accuracy.fakequant import fake_quantize  # noqa: E402
from zqcompile.config import get_config  # noqa: E402
from zqcompile.models import load_model, load_tokenizer  # noqa: E402

ROLES = {"q/k/v": r"query|key|value", "value": r"value", "attention output": r"attention\.output\.dense",
         "fc1 (intermediate)": r"intermediate\.dense", "fc2 (output)": r"\d\.output\.dense"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/accuracy/results/minilm_sensitivity.json")
    args = ap.parse_args()
    tok, model = load_tokenizer("minilm"), load_model("minilm")

    def least_cosine(cfg, sentences=SENTENCES) -> float:
        enc = tok(sentences, padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        pool = lambda m: (m(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]).sum(1) \
            / mask.sum(1, keepdim=True)  # noqa: E731
        return float(F.cosine_similarity(pool(fake_quantize(copy.deepcopy(model), cfg)), pool(model), dim=-1).min())

    w8a8, none = get_config("w8a8"), get_config("none")
    rows = {"w8a8": least_cosine(w8a8), "w8a8, 'Thanks.' alone (no padding)": least_cosine(w8a8, ["Thanks."]),
            "w8a16 (every GEMM)": least_cosine(w8a8.with_overrides({".": "w8a16"}))}
    print(rows, flush=True)
    per_gemm = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and n.startswith("encoder."):
            key = re.escape(n) + "$"
            per_gemm[n] = {"alone_8bit": least_cosine(none.with_overrides({key: "w8a8"})),
                           "alone_float": least_cosine(w8a8.with_overrides({key: "fp16"}))}
            print(n, per_gemm[n], flush=True)
    per_role = {r: {"alone_8bit": least_cosine(none.with_overrides({p: "w8a8"})),
                    "alone_float": least_cosine(w8a8.with_overrides({p: "fp16"})),
                    "w8a16": least_cosine(w8a8.with_overrides({p: "w8a16"}))} for r, p in ROLES.items()}
    print(json.dumps(per_role, indent=1))
    Path(args.out).write_text(json.dumps({"model": "all-MiniLM-L6-v2", "sentences": SENTENCES, "metric": "least cosine "
                                          "of mean-pooled embeddings vs fp32", "path": "fakequant", "rows": rows,
                                          "per_role": per_role, "per_gemm": per_gemm, "torch": torch.__version__,
                                          "command": " ".join(sys.argv)}, indent=1))


if __name__ == "__main__":
    with torch.no_grad():
        main()
