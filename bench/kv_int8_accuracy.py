"""INT8 KV cache (per-token-per-head scales) vs the FP32 model on SmolLM2-135M: teacher-forced perplexity of
the first N tokens of /usr/share/common-licenses/GPL-3 (one window, token by token through the decode graph,
so every attention reads the quantized cache), cache bytes, and the France chat answer.
Usage: python bench/kv_int8_accuracy.py [--tokens 256] [--config none] [--out FILE.json]"""
from __future__ import annotations

import argparse
import json
import math

import torch

from zqcompile.config import get_config
from zqcompile.generation.generator import build_generator
from zqcompile.generation.kv_cache import CacheSpec
from zqcompile.models import load_model, load_tokenizer
from zqcompile.generation.sampling import SamplingParams


def teacher_forced_nll(gen, ids: torch.Tensor) -> float:
    n, L = ids.shape[1], gen.spec.max_cache_len
    mask = torch.zeros(1, L, dtype=torch.long)
    mask[:, 0] = 1
    nll = 0.0
    with torch.no_grad():
        logits = gen.prefill(ids[:, :1], torch.zeros(1, 1, dtype=torch.long), torch.arange(1), mask)[0][:, -1]
        for t in range(1, n):
            nll -= float(logits.log_softmax(-1)[0, ids[0, t]])
            mask[:, t] = 1
            logits = gen.decode(ids[:, t:t + 1], torch.tensor([[t]]), torch.tensor([t]), mask)[0][:, -1]
    return nll / (n - 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--config", default="none")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args()
    model, tok = load_model("smollm2"), load_tokenizer("smollm2")
    text = open("/usr/share/common-licenses/GPL-3").read()
    ids = tok(text, return_tensors="pt")["input_ids"][:, :a.tokens]
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])
    rows = {"fp32 model (full forward)": {"ppl": math.exp(float(ref))}}
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt")
    chat = chat if isinstance(chat, torch.Tensor) else chat["input_ids"]
    for kv in ("model", "int8"):
        gen = build_generator(model, get_config(a.config), CacheSpec(1, a.tokens + 8, kv))
        out = gen.generate(chat, None, 12, SamplingParams(), tok.eos_token_id, None, None)
        rows[f"{a.config} + KV {kv}"] = {"ppl": math.exp(teacher_forced_nll(gen, ids)),
                                          "cache_bytes": gen.record.cache_bytes,
                                          "answer": tok.decode(out[0, chat.shape[1]:], skip_special_tokens=True)}
        print(rows, flush=True)
    result = json.dumps(dict(tokens=a.tokens, text="GPL-3 first tokens", config=a.config, rows=rows), indent=1)
    print(result)
    if a.out:
        with open(a.out, "w") as f:
            f.write(result)


if __name__ == "__main__":
    main()
