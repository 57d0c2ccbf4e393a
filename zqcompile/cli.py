"""`zqcompile` command line: compile, report, demo (and the commands other modules register)."""
from __future__ import annotations

import argparse
import sys
import time

import torch


def _example_ids(model, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    vocab = getattr(getattr(model, "config", None), "vocab_size", 1000)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def cmd_compile(args) -> int:
    import zqcompile as zq
    from .models import load_model
    model = load_model(args.model)
    ids = _example_ids(model, args.batch, args.seq)
    t0 = time.perf_counter()
    engine = zq.compile(model, (ids,), config=args.config, dump_dir=args.dump)
    print(engine.report())
    print(f"\ncompiled in {time.perf_counter() - t0:.1f} s")
    if args.out:
        engine.save(args.out)
        print(f"saved {args.out}")
    if args.dump:
        print(f"graph dumps in {args.dump}/")
    return 0


def cmd_report(args) -> int:
    import zqcompile as zq
    print(zq.load(args.engine).report())
    return 0


def _rel_err(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def demo_rows(families=("bert", "gpt2"), configs=("w8a8", "w4/8a8", "ptq-static")) -> list[dict]:
    """Compile small built-in models and compare each engine with fp32 eager (also used by tests)."""
    import zqcompile as zq
    from .models import tiny_model
    rows = []
    for fam in families:
        model = tiny_model(fam, hidden=128, layers=2)
        ids = _example_ids(model, 2, 32)
        test_ids = _example_ids(model, 3, 48, seed=1)
        with torch.no_grad():
            ref = model(test_ids)
        ref_t = ref.logits if hasattr(ref, "logits") else ref.last_hidden_state
        fp_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        for cfg in configs:
            engine = zq.compile(model, (ids,), config=cfg)
            out = engine(test_ids)
            out_t = out.logits if hasattr(out, "logits") else out.last_hidden_state
            row = {"model": f"{fam} (random init)", "config": cfg, "rel_l2_err": _rel_err(out_t, ref_t),
                   "weight_bytes_ratio": engine.weight_bytes() / fp_bytes, "engine": engine}
            if hasattr(ref, "logits"):
                row["top1_agree"] = float((out_t.argmax(-1) == ref_t.argmax(-1)).float().mean())
            rows.append(row)
    return rows


def cmd_demo(args) -> int:
    if getattr(args, "real", False):
        from .demo_real import run_real_demo
        return run_real_demo(args)
    rows = demo_rows()
    print(rows[3]["engine"].report())
    print("\nNumerics vs fp32 eager (reference CPU ops):")
    print(f"{'model':20} {'config':11} {'rel L2 err':>10} {'top-1 agree':>11} {'bytes vs fp32':>13}")
    for r in rows:
        agree = f"{r['top1_agree']:.3f}" if "top1_agree" in r else "-"
        print(f"{r['model']:20} {r['config']:11} {r['rel_l2_err']:10.4f} {agree:>11} {r['weight_bytes_ratio']:13.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zqcompile", description="ZeroQuant post-training quantization compiler")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile a model folder / .gguf / packaged model name")
    c.add_argument("model", help="Hugging Face folder, .gguf file, or 'minilm' / 'smollm2'")
    c.add_argument("--config", default="w8a8", help="preset: w8a8, w4/8a8, w4/8a16, w8a8/16, w8a16, ptq-static, none")
    c.add_argument("--out", help="write the engine here (e.g. model.zq)")
    c.add_argument("--dump", help="write per-pass graph dumps into this folder")
    c.add_argument("--batch", type=int, default=2)
    c.add_argument("--seq", type=int, default=32)
    c.set_defaults(fn=cmd_compile)
    r = sub.add_parser("report", help="print the report of a saved engine")
    r.add_argument("engine")
    r.set_defaults(fn=cmd_report)
    d = sub.add_parser("demo", help="compile small built-in models and compare with fp32")
    d.add_argument("--real", action="store_true", help="run the real SmolLM2-135M model (needs the [real] extra)")
    d.set_defaults(fn=cmd_demo)
    for add_command in _EXTENSIONS:
        add_command(sub)
    return p


def _add_export(sub) -> None:
    from .backends.cli_export import add_export_command
    from .engine import load
    add_export_command(sub, load)


def _add_generate(sub) -> None:
    from .generate_cli import add_generate_command
    add_generate_command(sub)


def _add_accuracy(sub) -> None:
    from .eval_cli import add_eval_command
    from .inspect import add_inspect_command
    add_eval_command(sub)
    add_inspect_command(sub)


# Commands that live beside the feature they drive: each adds its subparser.
_EXTENSIONS = [_add_export, _add_generate, _add_accuracy]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import CaptureError, ConfigError, EngineFileError, InputError, WeightError
    from .models import ModelLoadError
    handler = getattr(args, "fn", None) or args.func
    try:
        return handler(args)
    except (ConfigError, CaptureError, InputError, WeightError, EngineFileError, ModelLoadError,
            FileNotFoundError, OSError) as e:
        print(f"zqcompile {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
