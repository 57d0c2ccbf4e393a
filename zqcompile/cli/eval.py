"""`zqcompile eval MODEL --config PRESET [--lkd random]`: accuracy of a quantized model against its fp32
self, on real text: perplexity for causal LMs, embedding agreement for encoders.

The quantized model is measured through the fake-quant path (`--path fakequant`, module-level, independent
of the compiler) or through the compiled engine (`--path engine`, needs `zqcompile.api.compile`).
cli/main.py calls `add_eval_command(subparsers)`; the handler is `run_eval(args)` (heavy imports inside it).
"""
from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path
from typing import TYPE_CHECKING

from zqcompile.config import LKDConfig, get_config, with_attention
from zqcompile.errors import InputError, ModelLoadError

if TYPE_CHECKING:
    import torch

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"


def add_eval_command(subparsers) -> argparse.ArgumentParser:
    from zqcompile.cli.main import budget_fraction
    p = subparsers.add_parser("eval", help="perplexity / encoder agreement of a quantized model vs fp32")
    p.add_argument("model", help="HF folder, .gguf file, or an installed model name (smollm2, minilm)")
    p.add_argument("--config", default="w8a8", help="preset name (w8a8, w4/8a8, ptq-static, ...)")
    p.add_argument("--text", default=DEFAULT_TEXT, help=f"text file to evaluate on (default {DEFAULT_TEXT})")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate on the first N tokens only")
    p.add_argument("--window", type=int, default=512, help="perplexity window (tokens)")
    p.add_argument("--stride", type=int, default=None, help="window stride (default: = window, no overlap)")
    p.add_argument("--lkd", default=None, metavar="DATA",
                   help="run LKD first: 'random' or 'generated' (data-free: uniform random tokens, or text sampled from "
                        "the fp model) or a path to a text file (not the eval text)")
    p.add_argument("--lkd-steps", type=int, default=LKDConfig.steps)
    p.add_argument("--lkd-lr", type=float, default=None,
                   help="Adam lr of the block weights (default: by the LKD data, zqcompile.config.LKD_TUNING)")
    p.add_argument("--lkd-clip-lr", type=float, default=None,
                   help="Adam lr of the learned weight clipping factors (0: keep the max-based scales; default: by "
                        "the LKD data)")
    p.add_argument("--calib-text", default=None, metavar="PATH",
                   help="calibrate (ptq-static ranges, w8a8-fws feature scales) on this text instead of the first "
                        "windows of --text")
    p.add_argument("--accuracy-budget", type=budget_fraction, default=None, metavar="PCT",
                   help="feature-wise scales first, then the fewest GEMMs in FP16 for which the expected "
                        "perplexity increase on the calibration text (exp of the next-token KL to the float model) "
                        "stays within PCT (e.g. 1%%) (--path engine)")
    p.add_argument("--attention", choices=["int8", "fp8", "int8-fp8"], default=None,
                   help="also quantize the attention products Q.K^T and P.V (ZeroQuant-HERO; int8-fp8: P.V in FP8; "
                        "--path engine)")
    p.add_argument("--attention-scales", choices=["head", "token"], default="token",
                   help="--attention's scales: per token for Q / K and per channel for V (default), or per head")
    p.add_argument("--path", choices=["fakequant", "engine"], default="fakequant",
                   help="measure the quantized model by fake quantization or through the compiled engine")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=lambda args: (run_eval(args), 0)[1])
    return p


def load_for_eval(name: str):
    """(model, tokenizer or None, is_causal_lm) for a folder, a .gguf file or a packaged model name."""
    from zqcompile.models import load_model, load_tokenizer
    model = load_model(name)
    try:
        tok = load_tokenizer(name)
    except (OSError, ValueError, ModelLoadError):
        tok = None
    return model, tok, model.get_output_embeddings() is not None


def _chunks(ids: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [c.view(1, -1) for c in ids.split(n) if c.numel() == n]


def _quantized(model, config, calib: list[torch.Tensor], path: str, example: torch.Tensor,
               accuracy_budget: float | None = None):
    if path == "engine":
        try:
            from zqcompile.api import compile as zq_compile
        except ImportError:
            raise InputError("--path engine needs zqcompile.api.compile, which this installation lacks; "
                             "use --path fakequant") from None
        return zq_compile(model, (example,), config, calibration_data=[(c,) for c in calib], generation=False,
                          accuracy_budget=accuracy_budget)
    from zqcompile.accuracy.fakequant import calibrate_static, fake_quantize
    fq = fake_quantize(copy.deepcopy(model), config)
    calibrate_static(fq, calib)
    return fq


def _read_text(path: str, flag: str) -> str:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{flag} {p}: no such file")
    if p.is_dir():
        raise InputError(f"{flag} {p} is a directory; give a text file")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise InputError(f"{flag} {p} is not UTF-8 text") from None
    except OSError as e:
        raise InputError(f"{flag} {p} cannot be read: {e.strerror or e}") from None
    if not text.strip():
        raise InputError(f"{flag} {p} is empty")
    return text


def _check_args(args: argparse.Namespace) -> tuple[str, str | None]:
    """Every argument checked before the model loads: (eval text, LKD text or None)."""
    if args.max_tokens is not None and args.max_tokens < 1:
        raise InputError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.window < 2:
        raise InputError(f"--window must be >= 2 (a token and the one it predicts), got {args.window}")
    if args.stride is not None and not 1 <= args.stride <= args.window:
        raise InputError(f"--stride must be between 1 and --window ({args.window}), got {args.stride}")
    if args.lkd_steps < 0:
        raise InputError(f"--lkd-steps must be >= 0, got {args.lkd_steps}")
    if args.lkd_lr is not None and (not math.isfinite(args.lkd_lr) or args.lkd_lr <= 0):
        raise InputError(f"--lkd-lr must be a number > 0, got {args.lkd_lr}")
    if args.lkd_clip_lr is not None and (not math.isfinite(args.lkd_clip_lr) or args.lkd_clip_lr < 0):
        raise InputError(f"--lkd-clip-lr must be a number >= 0, got {args.lkd_clip_lr}")
    if args.json:
        from zqcompile.files import check_output_file, looks_like_json
        check_output_file(args.json, "eval results", replaceable=looks_like_json, kind="a JSON file")
    text = _read_text(args.text, "--text")
    if args.accuracy_budget is not None and args.path != "engine":
        raise InputError("--accuracy-budget chooses FP16 GEMMs in the compiler: use --path engine")
    if args.attention and args.path != "engine":
        raise InputError("--attention quantizes the attention products in the compiler: use --path engine")
    if get_config(args.config).feature_scales is not None and args.path != "engine":
        raise InputError(f"--config {args.config} uses feature-wise scales, which the compiler applies: "
                         f"use --path engine")
    if args.calib_text:
        if Path(args.calib_text).resolve() == Path(args.text).resolve():
            raise InputError("--calib-text must not be the evaluation text (--text); omit it to calibrate on --text")
        _read_text(args.calib_text, "--calib-text")
    lkd_text = None
    if args.lkd and args.lkd not in ("random", "generated"):
        if Path(args.lkd).resolve() == Path(args.text).resolve():
            raise InputError("--lkd text must not be the evaluation text (--text)")
        lkd_text = _read_text(args.lkd, "--lkd")
    return text, lkd_text


def _check_tokens(args: argparse.Namespace, ids: torch.Tensor, n_ctx: int, context: int | None) -> None:
    if context is not None and n_ctx > context:
        raise InputError(f"windows of {n_ctx} tokens (--window) are longer than the model's context of {context} "
                         f"tokens; use --window {context} or less")
    n = ids.numel()
    cut = f" (its first --max-tokens {args.max_tokens})" if args.max_tokens is not None else ""
    if n < 2:
        raise InputError(f"--text {args.text}{cut} has {n} token(s); eval needs at least 2: use a longer text")
    if n < n_ctx:
        raise InputError(f"--text {args.text}{cut} has {n} tokens, fewer than one window of {n_ctx}: lower "
                         f"--window to {n} or less, or raise --max-tokens / use a longer text")


def _write_json(path: str, result: dict) -> None:
    from zqcompile.files import write_json_atomic
    write_json_atomic(path, result, "eval results")


def run_eval(args: argparse.Namespace) -> dict:
    from zqcompile.accuracy.eval import encoder_agreement, perplexity, tokenize_text
    from zqcompile.accuracy.lkd import max_positions, run_lkd_with_stats
    from zqcompile.models import load_model, load_tokenizer
    config = get_config(args.config)
    text, lkd_text = _check_args(args)
    if args.attention:
        config = with_attention(config, args.attention, args.attention_scales)
    tokenizer = load_tokenizer(args.model)  # before the model: a folder without one fails fast
    ids = tokenize_text(tokenizer, text)[: args.max_tokens]
    fp_model = load_model(args.model)
    is_causal_lm = fp_model.get_output_embeddings() is not None
    n_ctx = args.window if is_causal_lm else min(args.window, 128)
    _check_tokens(args, ids, n_ctx, max_positions(fp_model))
    text_path = Path(args.text)
    result: dict = {"model": args.model, "config": config.name, "text": str(text_path), "tokens": ids.numel(),
                    "path": args.path}
    qmodel_src = fp_model
    if args.lkd:
        data = args.lkd if args.lkd in ("random", "generated") else lkd_text
        qmodel_src = copy.deepcopy(fp_model)
        lkd = LKDConfig(data=data, steps=args.lkd_steps, lr=args.lkd_lr, clip_lr=args.lkd_clip_lr)
        lkd = lkd.resolved_for(data)  # the settings run_lkd uses, for --json
        _, stats = run_lkd_with_stats(qmodel_src, config, lkd, tokenizer)
        result["lkd"] = [s.__dict__ for s in stats]
        result["lkd_config"] = {k: v for k, v in lkd.__dict__.items() if k != "data"} | {"data": args.lkd}
    calib_ids = tokenize_text(tokenizer, _read_text(args.calib_text, "--calib-text")) if args.calib_text else ids
    calib = _chunks(calib_ids, n_ctx)[: config.calibration_batches]
    if not calib:
        raise InputError(f"--calib-text {args.calib_text} has fewer than one window of {n_ctx} tokens")
    result["calibration_text"] = args.calib_text or str(text_path)
    qmodel = _quantized(qmodel_src, config, calib, args.path, calib[0], args.accuracy_budget)
    if args.accuracy_budget is not None:
        result["accuracy_budget"] = next(f["note"] for f in qmodel.record.fusions if f["kind"] == "accuracy-budget")
        print(f"accuracy budget {args.accuracy_budget:.2%}: {result['accuracy_budget']}")
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
        _write_json(args.json, result)
    return result
