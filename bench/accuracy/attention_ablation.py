"""Where ZeroQuant-HERO's quantized attention loses accuracy on SmolLM2-135M: perplexity (GPL-3, windows of 512,
engine path: the float model compiled with config "none" + QuantConfig.attention, so the GEMMs stay float) with
one operand group of the attention products quantized at a time -- Q and K only (Q.K^T on codes, P and V float),
P and V only, P alone -- INT8 or FP8, per-head or per-token scales. The op's reference (ops/quant_math) is
wrapped for the run; the engine path is otherwise the one `zqcompile eval --attention` measures. CPU.

    python bench/accuracy/attention_ablation.py [--out bench/accuracy/results/attention_ablation.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import zqcompile as zq  # noqa: E402
from zqcompile.accuracy.eval import perplexity, tokenize_text  # noqa: E402
from zqcompile.config import AttentionQuant, get_config  # noqa: E402
from zqcompile.models import load_model, load_tokenizer  # noqa: E402
from zqcompile.ops import quant_math as qm  # noqa: E402

TEXT = "/usr/share/common-licenses/GPL-3"
# which operands keep their codes: q, k (Q.K^T), p, v (P.V); the others pass through as float
PARTS = {"all": "qkpv", "q_k": "qk", "p_v": "pv", "p": "p", "v": "v"}


def partial(parts: str):
    """qm._codes wrapped so only the named operands are quantized: the call order in quant_attention is q, k, v
    (then p), so the wrapper counts the calls of one attention."""
    real, order = qm._codes, "qkvp"
    state = {"i": 0}

    def codes(x, fp8):
        name = order[state["i"] % 4]
        state["i"] += 1
        if name in parts:
            return real(x, fp8)
        return x, torch.ones((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    return codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/accuracy/results/attention_ablation.json")
    ap.add_argument("--max-tokens", type=int, default=None)
    args = ap.parse_args()
    tok, model = load_tokenizer("smollm2"), load_model("smollm2")
    ids = tokenize_text(tok, Path(TEXT).read_text())[: args.max_tokens]
    example = ids[:512].view(1, -1)
    rows = [{"variant": "fp32", "ppl": perplexity(model, ids, window=512).ppl}]
    print(rows[0], flush=True)
    plan = [("int8", "head", n) for n in PARTS] + [("int8", "token", "q_k"), ("int8", "token", "v"),
                                                   ("fp8", "head", "q_k"), ("fp8", "head", "p")]
    for dtype, gran, name in plan:
        parts = PARTS[name]
        t0 = time.time()
        cfg = replace(get_config("none"), name="none+attn", attention=AttentionQuant(dtype, gran))
        engine = zq.compile(model, (example,), cfg, generation=False)
        # the head-granularity path quantizes through _head_codes -> _codes as well: one wrapper serves
        with mock.patch.object(qm, "_codes", partial(parts)):
            r = perplexity(engine, ids, window=512)
        row = {"variant": f"{dtype} {gran} {name}", "ppl": r.ppl, "seconds": round(time.time() - t0, 1)}
        row["vs_fp32_pct"] = 100 * (row["ppl"] / rows[0]["ppl"] - 1)
        rows.append(row)
        print(row, flush=True)
    Path(args.out).write_text(json.dumps({"text": TEXT, "command": " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
