"""`zqcompile inspect MODEL --out ranges.png`: token-wise activation and row-wise weight ranges per GEMM (the
paper's Figure 1), drawn by zqcompile.accuracy.ranges."""
from __future__ import annotations

import argparse

DEFAULT_PROMPT = ("The quick brown fox jumps over the lazy dog. Quantization maps floating-point values to "
                  "a small set of integers; outliers in a few tokens or channels stretch the range.")


def add_inspect_command(subparsers) -> argparse.ArgumentParser:
    from zqcompile.cli.main import positive_int
    p = subparsers.add_parser("inspect", help="token-wise activation / row-wise weight ranges (paper Fig. 1)")
    p.add_argument("model", help="HF folder, .gguf file, or an installed model name (smollm2, minilm)")
    p.add_argument("--out", default="ranges.png", help="figure path (.png needs matplotlib; else .svg)")
    p.add_argument("--text", default=None, help="text file to run (default: a built-in sentence)")
    p.add_argument("--max-tokens", type=positive_int, default=256)
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.set_defaults(func=lambda args: (run_inspect(args), 0)[1])
    return p


def run_inspect(args):
    from pathlib import Path

    import torch

    from zqcompile.accuracy.lkd import max_positions
    from zqcompile.accuracy.ranges import collect_ranges, figure_path, plot_ranges, summary_table
    from zqcompile.cli.eval import load_for_eval
    from zqcompile.files import check_output_file, looks_like_figure, looks_like_json, write_json_atomic
    out = figure_path(args.out)
    if out != Path(args.out):
        print(f"matplotlib is not installed (pip install -e '.[plot]'): writing an SVG instead: {out}")
    check_output_file(out, "figure", replaceable=looks_like_figure, kind="a PNG or SVG figure")
    if args.json:
        check_output_file(args.json, "range numbers", replaceable=looks_like_json, kind="a JSON file")
    model, tokenizer, _ = load_for_eval(args.model)
    args.max_tokens = min(args.max_tokens, max_positions(model) or args.max_tokens)
    if tokenizer is not None:
        text = Path(args.text).read_text() if args.text else DEFAULT_PROMPT
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][: args.max_tokens]])
    else:  # no tokenizer: random ids still show the weight ranges and the activation shape
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (1, args.max_tokens), generator=torch.Generator().manual_seed(0))
    ranges = collect_ranges(model, ids)
    print(summary_table(ranges))
    written = plot_ranges(ranges, out)
    print(f"wrote {written}")
    if args.json:
        write_json_atomic(args.json, [
            {"fqn": r.fqn, "role": r.role, "layer": r.layer, "act_min": r.act_min.tolist(),
             "act_max": r.act_max.tolist(), "weight_row_min": r.weight_row_min.tolist(),
             "weight_row_max": r.weight_row_max.tolist()} for r in ranges], "range numbers")
    return ranges
