"""`zqcompile` command line: compile, report, demo (and the commands other modules register).

Every user error ends in one line `zqcompile <command>: error: <cause and what to do>` and exit code 2;
arguments and output paths are checked before any model is loaded; Ctrl-C prints `interrupted; nothing
written` (exit 130) and leaves no file behind: outputs are staged and put in place only at the end. Heavy
imports (torch, transformers) happen inside the commands, so even an early Ctrl-C is handled.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage dump)."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _example_ids(model, batch: int, seq: int, seed: int = 0):
    import torch
    vocab = getattr(getattr(model, "config", None), "vocab_size", 1000)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def check_seq_fits(model, seq: int, what: str = "--seq") -> None:
    """A sequence longer than the model's positions fails deep in capture: say so first."""
    from .capture import InputError
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit and seq > limit:
        raise InputError(f"{what} {seq} is longer than the model's context ({limit} positions); "
                         f"use at most {limit}")


def cmd_compile(args) -> int:
    from .config import get_config
    from .engine import is_engine_file
    from .files import Staged, check_output_file
    from .graph_dump import check_dump_dir, stage_dump
    if args.out:
        check_output_file(args.out, "engine", replaceable=is_engine_file)
    if args.dump:
        check_dump_dir(args.dump)
    get_config(args.config)  # a bad preset name fails before the model loads
    import zqcompile as zq
    from .models import load_model
    model = load_model(args.model)
    check_seq_fits(model, args.seq)
    ids = _example_ids(model, args.batch, args.seq)
    t0 = time.perf_counter()
    engine = zq.compile(model, (ids,), config=args.config)
    print(engine.report())
    print(f"\ncompiled in {time.perf_counter() - t0:.1f} s")
    with Staged() as outputs:
        if args.out:
            engine.write_to(outputs.file(args.out, "engine", replaceable=is_engine_file))
        if args.dump:
            staged = stage_dump(engine, args.dump)
            outputs.action(staged.commit, staged.discard)
        outputs.commit()
    if args.out:
        print(f"saved {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB)")
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
    import torch

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
    p = _Parser(prog="zqcompile", description="ZeroQuant post-training quantization compiler")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    c = sub.add_parser("compile", help="compile a model folder / .gguf / packaged model name")
    c.add_argument("model", help="Hugging Face folder, .gguf file, or 'minilm' / 'smollm2'")
    c.add_argument("--config", default="w8a8", help="preset: w8a8, w4/8a8, w4/8a16, w8a8/16, w8a16, ptq-static, none")
    c.add_argument("--out", help="write the engine here (e.g. model.zq); an existing engine there is replaced")
    c.add_argument("--dump", help="write per-pass graph dumps into this folder (new, empty, or an earlier dump)")
    c.add_argument("--batch", type=positive_int, default=2, help="example batch size (the engine takes any)")
    c.add_argument("--seq", type=positive_int, default=32, help="example sequence length (the engine takes any)")
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


def _load_engine(path: str):
    from .engine import load
    return load(path)


def _add_export(sub) -> None:
    from .backends.cli_export import add_export_command
    add_export_command(sub, _load_engine)


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


def quiet_libraries() -> None:
    """Keep the terminal to zqcompile's own output: no Hugging Face info/progress chatter, no warnings
    from libraries about things the user did not ask for (optional packages missing, tokenizer lengths)."""
    import logging
    import warnings
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", module=r"(transformers|torch|huggingface_hub|onnxscript|onnx_ir)\b")
    for name in ("transformers", "torch", "huggingface_hub", "onnxscript", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _user_errors() -> tuple[type[BaseException], ...]:
    from . import CaptureError, ConfigError, EngineFileError, InputError, WeightError
    from .models import ModelLoadError
    return (ConfigError, CaptureError, InputError, WeightError, EngineFileError, ModelLoadError, OSError)


def main(argv: list[str] | None = None) -> int:
    command = "zqcompile"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        command = f"zqcompile {args.command}"
        quiet_libraries()
        from . import progress
        handler = getattr(args, "fn", None) or args.func
        errors = _user_errors()
        try:
            with progress.forced(True):
                return handler(args)
        except BrokenPipeError:  # `zqcompile report m.zq | head`: the reader left; not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except errors as e:
            print(f"{command}: error: {_one_line(e)}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print(f"\n{command}: interrupted; nothing written", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split("\n")) if len(text) < 600 else text.splitlines()[0]


if __name__ == "__main__":
    sys.exit(main())
