"""The `zqcompile` command: the parser (one module per command adds its subcommand), one-line errors and
Ctrl-C handling.

Every user error ends in one line `zqcompile <command>: error: <cause and what to do>` and exit code 2;
arguments and output paths are checked before any model is loaded; Ctrl-C prints `interrupted; nothing
written` (exit 130) and leaves no file behind (outputs are staged and put in place only at the end). A
tensor-parallel rank whose peers failed or timed out prints one line too and exits 1.
The command modules import torch and transformers inside their handlers, so the parser builds at once.
"""
from __future__ import annotations

import argparse
import os
import sys


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage dump)."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def budget_fraction(text: str) -> float:
    """An accuracy budget: '1%' or 0.01."""
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction like 1% or 0.01, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0% and 100% (exclusive), got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _load_engine(path: str):
    from zqcompile.runtime.engine import load
    return load(path)


def build_parser() -> argparse.ArgumentParser:
    from zqcompile.cli.compile import add_compile_commands
    from zqcompile.cli.demo import add_demo_command
    from zqcompile.cli.eval import add_eval_command
    from zqcompile.cli.export import add_export_command
    from zqcompile.cli.generate import add_generate_command
    from zqcompile.cli.inspect_ranges import add_inspect_command
    p = _Parser(prog="zqcompile", description="ZeroQuant post-training quantization compiler")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_compile_commands(sub)
    add_demo_command(sub)
    add_export_command(sub, _load_engine)
    add_generate_command(sub)
    add_eval_command(sub)
    add_inspect_command(sub)
    return p


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


def main(argv: list[str] | None = None) -> int:
    command = "zqcompile"
    try:
        args = build_parser().parse_args(argv)
        command = f"zqcompile {args.command}"
        quiet_libraries()
        from zqcompile import progress
        from zqcompile.errors import USER_ERRORS, TensorParallelError
        handler = getattr(args, "fn", None) or args.func
        try:
            with progress.forced(True):
                return handler(args)
        except BrokenPipeError:  # `zqcompile report m.zq | head`: the reader left; not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except USER_ERRORS as e:
            print(f"{command}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        except TensorParallelError as e:  # another rank failed: not the user's error, and nothing to clean up
            print(f"{command}: error: {_one_line(e)}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)  # a normal exit would wait on (or abort in) the broken process group's threads
    except KeyboardInterrupt:
        print(f"\n{command}: interrupted; nothing written", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split("\n")) if len(text) < 600 else text.splitlines()[0]


if __name__ == "__main__":
    sys.exit(main())
