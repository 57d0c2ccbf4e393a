"""`zqcompile eval MODEL --config PRESET [--lkd random]`: accuracy of a quantized model against its fp32
self, on real text: perplexity for causal LMs, embedding agreement for encoders.

The quantized model is measured through the fake-quant path (`--path fakequant`, module-level, independent
of the compiler) or through the compiled engine (`--path engine`, needs `zqcompile.api.compile`).
cli.py calls `add_eval_command(subparsers)`; the handler is `run_eval(args)`.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from .config import LKDConfig, get_config
from .eval import encoder_agreement, perplexity, tokenize_text
from .fakequant import calibrate_static, fake_quantize
from .lkd import run_lkd_with_stats
from .models import ModelLoadError, load_model, load_tokenizer

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"


def add_eval_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="perplexity / encoder agreement of a quantized model vs fp32")
    p.add_argument("model", help="HF folder, .gguf file, or an installed model name (smollm2, minilm)")
    p.add_argument("--config", default="w8a8", help="preset name (w8a8, w4/8a8, ptq-static, ...)")
    p.add_argument("--text", default=DEFAULT_TEXT, help=f"text file to evaluate on (default {DEFAULT_TEXT})")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate on the first N tokens only")
    p.add_argument("--window", type=int, default=512, help="perplexity window (tokens)")
    p.add_argument("--stride", type=int, default=None, help="window stride (default: = window, no overlap)")
    p.add_argument("--lkd", default=None, metavar="DATA",
                   help="run LKD first: 'random' (data-free) or a path to a text file (not the eval text)")
    p.add_argument("--lkd-steps", type=int, default=LKDConfig.steps)
    p.add_argument("--lkd-lr", type=float, default=LKDConfig.lr)
    p.add_argument("--path", choices=["fakequant", "engine"], default="fakequant",
                   help="measure the quantized model by fake quantization or through the compiled engine")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=lambda args: (run_eval(args), 0)[1])
    return p


def load_for_eval(name: str):
    """(model, tokenizer or None, is_causal_lm) for a folder, a .gguf file or a packaged model name."""
    model = load_model(name)
    try:
        tok = load_tokenizer(name)
    except (OSError, ValueError, ModelLoadError):
        tok = None
    return model, tok, model.get_output_embeddings() is not None


def _chunks(ids: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [c.view(1, -1) for c in ids.split(n) if c.numel() == n]


def _quantized(model, config, calib: list[torch.Tensor], path: str, example: torch.Tensor):
    if path == "engine":
        try:
            from .api import compile as zq_compile
        except ImportError:
            raise SystemExit("--path engine needs zqcompile.api.compile, which this installation lacks; "
                             "use --path fakequant") from None
        return zq_compile(model, (example,), config, calibration_data=[(c,) for c in calib])
    fq = fake_quantize(copy.deepcopy(model), config)
    calibrate_static(fq, calib)
    return fq


def run_eval(args: argparse.Namespace) -> dict:
    config = get_config(args.config)
    fp_model, tokenizer, is_causal_lm = load_for_eval(args.model)
    if tokenizer is None:
        raise SystemExit(f"{args.model}: no tokenizer found next to the model; eval needs one to read text")
    text_path = Path(args.text)
    if not text_path.is_file():
        raise SystemExit(f"eval text not found: {text_path} (pass --text FILE)")
    ids = tokenize_text(tokenizer, text_path.read_text())[: args.max_tokens]
    n_ctx = args.window if is_causal_lm else min(args.window, 128)
    result: dict = {"model": args.model, "config": config.name, "text": str(text_path), "tokens": ids.numel(),
                    "path": args.path}
    qmodel_src = fp_model
    if args.lkd:
        data = "random" if args.lkd == "random" else Path(args.lkd).read_text()
        if args.lkd != "random" and Path(args.lkd).resolve() == text_path.resolve():
            raise SystemExit("--lkd text must not be the evaluation text")
        qmodel_src = copy.deepcopy(fp_model)
        _, stats = run_lkd_with_stats(qmodel_src, config, LKDConfig(data=data, steps=args.lkd_steps,
                                                                    lr=args.lkd_lr), tokenizer)
        result["lkd"] = [s.__dict__ for s in stats]
    calib = _chunks(ids, n_ctx)[: config.calibration_batches]
    qmodel = _quantized(qmodel_src, config, calib, args.path, calib[0])
    if is_causal_lm:
        for name, fn in (("fp32", fp_model), (config.name, qmodel)):
            r = perplexity(fn, ids, window=args.window, stride=args.stride, progress=True)
            result[f"ppl_{name}"] = r.ppl
            print(f"{name:12s} perplexity {r.ppl:.3f} ({r.num_tokens_scored} tokens, {r.num_windows} windows "
                  f"of {r.window}, stride {r.stride})")
        result["ppl_increase_pct"] = 100 * (result[f"ppl_{config.name}"] / result["ppl_fp32"] - 1)
    else:
        a = encoder_agreement(fp_model, qmodel, _chunks(ids, n_ctx))
        result.update(a.__dict__)
        print(f"{config.name}: embedding cosine vs fp32 mean {a.cosine_mean:.5f} min {a.cosine_min:.5f}, "
              f"token cosine mean {a.token_cosine_mean:.5f} over {a.num_sequences} sequences of {n_ctx} tokens")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result
