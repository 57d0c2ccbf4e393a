"""`zqcompile export model.zq --format onnx|onnx-trt|tensorrt|compressed-tensors -o PATH`: the export subcommand,
for cli/main.py to wire with `add_export_command(subparsers, load=zqcompile.api.load)` (loading stays with the API
layer)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

FORMATS = {"onnx": "standard ONNX (opset 18), runs in ONNX Runtime",
           "onnx-trt": "ONNX with fused ops as zq.trt TensorRT plugin nodes",
           "tensorrt": "TensorRT plan built with zqcompile's plugins (needs TensorRT)",
           "compressed-tensors": "Hugging Face folder with the quantized weights (transformers, vLLM); -o a new "
                                 "or empty folder"}


def add_export_command(subparsers: argparse._SubParsersAction, load: Callable[[str], object]) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="export a compiled engine to ONNX, TensorRT or compressed-tensors",
                              description="\n".join(f"{k}: {v}" for k, v in FORMATS.items()),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine", help="a compiled engine saved by zq.save / `zqcompile compile` (.zq)")
    p.add_argument("--format", choices=sorted(FORMATS), default="onnx")
    p.add_argument("-o", "--output", required=True, help="file (folder for compressed-tensors) to write, atomically")
    p.add_argument("--plugin-library", default=None, help="libzq_trt_plugins.so (format tensorrt)")
    add_dtype_option(p)
    p.set_defaults(func=lambda args: run_export(args, load))
    return p


def add_dtype_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="compressed-tensors: dtype of the float tensors (default: as the engine holds them)")


def run_export(args: argparse.Namespace, load: Callable[[str], object]) -> int:
    from zqcompile.export.onnx import ExportError, export_onnx
    from zqcompile.export.tensorrt import TensorRTUnavailable, export_tensorrt
    from zqcompile.files import OutputPathError, check_output_dir, check_output_file, looks_like_onnx
    try:
        if args.dtype and args.format != "compressed-tensors":
            raise ExportError(f"--dtype sets the float tensors of a compressed-tensors folder, not of {args.format}")
        if args.format == "compressed-tensors":
            from zqcompile.export.compressed_tensors import WHAT, export_compressed_tensors, folder_bytes
            check_output_dir(args.output, WHAT)
            out = export_compressed_tensors(load(args.engine), args.output, dtype=args.dtype)
            print(f"wrote {out}/ ({folder_bytes(out) / 1e6:.2f} MB, compressed-tensors)")
            return 0
        check_output_file(args.output, "ONNX model" if args.format != "tensorrt" else "TensorRT plan",
                          replaceable=looks_like_onnx if args.format != "tensorrt" else None, kind="an ONNX model")
        engine = load(args.engine)
        if args.format == "tensorrt":
            out = export_tensorrt(engine, args.output, plugin_library=args.plugin_library)
        else:
            out = export_onnx(engine, args.output, dialect="standard" if args.format == "onnx" else "tensorrt")
    except (ExportError, TensorRTUnavailable, FileNotFoundError, OutputPathError) as e:
        print(f"zqcompile export: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({Path(out).stat().st_size / 1e6:.2f} MB, {args.format})")
    return 0
