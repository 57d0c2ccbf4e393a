"""LKD diagnostic on the first blocks of SmolLM2: per-block MSE before / after and the quantized chain's error.

    python bench/accuracy/lkd_diag.py --blocks 3 --variants old,clip [--data random|text]

The model is cut to its first `--blocks` transformer blocks; each variant (a set of LKDConfig fields) tunes a
copy, then the fake-quantized tuned blocks run in sequence on held-out batches (another seed, or the next text
tokens) and their last hidden state is compared with the fp blocks' (relative MSE: MSE / mean square of the fp
output). The un-tuned chain is the baseline. Writes results/lkd_diag.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench/accuracy"))

from run import LKD_TEXTS, configs  # noqa: E402
from zqcompile.accuracy.fakequant import fake_quantize  # noqa: E402
from zqcompile.accuracy.lkd import capture_block_inputs, find_blocks, lkd_batches, run_lkd_with_stats  # noqa: E402
from zqcompile.cli.eval import load_for_eval  # noqa: E402
from zqcompile.config import LKDConfig  # noqa: E402

VARIANTS = {  # name -> LKDConfig fields over the baseline LKDConfig(lr=1e-4, constant lr, fp input, no clipping)
    "old": dict(lr=1e-4, clip_lr=0.0, schedule="constant", student_input="fp"),
    "clip": dict(lr=1e-4, clip_lr=5e-3, schedule="cosine", student_input="fp"),
    "clip-q": dict(lr=1e-4, clip_lr=5e-3, schedule="cosine", student_input="quantized"),
    "clip-only-q": dict(lr=1e-12, clip_lr=5e-3, schedule="cosine", student_input="quantized"),
    "clip-w3e-4-q": dict(lr=3e-4, clip_lr=5e-3, schedule="cosine", student_input="quantized"),
    "clip1e-2-q": dict(lr=1e-4, clip_lr=1e-2, schedule="cosine", student_input="quantized"),
    "w-q": dict(lr=1e-4, clip_lr=0.0, schedule="cosine", student_input="quantized"),
    "w3e-4-q": dict(lr=3e-4, clip_lr=0.0, schedule="cosine", student_input="quantized"),
    "w1e-3-q": dict(lr=1e-3, clip_lr=0.0, schedule="cosine", student_input="quantized"),
    "clip-w1e-3-q": dict(lr=1e-3, clip_lr=5e-3, schedule="cosine", student_input="quantized"),
    "clip2e-3-w3e-4-q": dict(lr=3e-4, clip_lr=2e-3, schedule="cosine", student_input="quantized"),
    "nb32-clip-w3e-4-q": dict(lr=3e-4, clip_lr=5e-3, schedule="cosine", student_input="quantized", num_batches=32),
    "nb32-clip-w1e-3-q": dict(lr=1e-3, clip_lr=5e-3, schedule="cosine", student_input="quantized", num_batches=32),
}


@torch.no_grad()
def chain_error(fp_blocks, q_blocks, prefix: str, cfg, held_out) -> float:
    fq = [fake_quantize(copy.deepcopy(b), cfg, prefix=f"{prefix}.{k}") for k, b in enumerate(q_blocks)]
    num = den = 0.0
    for args, kw in held_out:
        x_fp = x_q = args[0]
        rest = args[1:]
        for b, s in zip(fp_blocks, fq):
            x_fp, x_q = b(x_fp, *rest, **kw), s(x_q, *rest, **kw)
            x_fp, x_q = (x if isinstance(x, torch.Tensor) else x[0] for x in (x_fp, x_q))
        num += float(((x_q - x_fp) ** 2).mean())
        den += float((x_fp ** 2).mean())
    return num / den


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--variants", default="old,clip,clip-q")
    ap.add_argument("--data", default="random", choices=["random", "text"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench/accuracy/results/lkd_diag.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, _ = load_for_eval("smollm2")
    prefix, blocks = find_blocks(model)
    del blocks[args.blocks:]
    model.config.num_hidden_layers = args.blocks
    cfg = configs()["w4/8a8"]
    text = "\n\n".join(Path("/usr/share/common-licenses", f).read_text() for f in LKD_TEXTS)
    base = LKDConfig(data="random" if args.data == "random" else text, steps=args.steps, num_batches=8,
                     progress=False)
    held = replace(base, seed=1234, num_batches=2) if args.data == "random" else None
    held_batches = lkd_batches(model, held) if held else [b for b in lkd_batches(
        model, replace(base, num_batches=base.num_batches + 2), tok)][-2:]
    held_out = [capture_block_inputs(model, blocks[0], b) for b in held_batches]
    fp_blocks = list(blocks)
    result = {"blocks": args.blocks, "data": args.data, "steps": args.steps, "command": " ".join(sys.argv),
              "untuned_chain_rel_mse": chain_error(fp_blocks, fp_blocks, prefix, cfg, held_out), "variants": {}}
    print(f"untuned chain rel mse {result['untuned_chain_rel_mse']:.4e}", flush=True)
    for name in args.variants.split(","):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        _, stats = run_lkd_with_stats(m, cfg, replace(base, **VARIANTS[name]), tok)
        secs = time.perf_counter() - t0
        err = chain_error(fp_blocks, list(find_blocks(m)[1]), prefix, cfg, held_out)
        result["variants"][name] = {"fields": VARIANTS[name], "chain_rel_mse": err, "seconds": secs,
                                    "blocks": [s.__dict__ for s in stats]}
        per = " ".join(f"{s.loss_before:.3g}->{s.loss_after:.3g}" for s in stats)
        print(f"{name:14s} chain rel mse {err:.4e} ({err / result['untuned_chain_rel_mse']:.3f} of untuned) "
              f"blocks {per} {secs / len(stats):.1f} s/block", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
