"""`zqcompile compile MODEL --config w8a8 --out m.zq --dump d/` (`--format compressed-tensors --out DIR`: a
Hugging Face folder instead of an engine; MODEL a compressed-tensors folder: its stored weights, no --config)
and `zqcompile report m.zq`."""
from __future__ import annotations

import os
import sys
import time


def example_ids(model, batch: int, seq: int, seed: int = 0):
    """Random token ids in the vocabulary of `model` (or of a model config): the example inputs capture needs."""
    import torch
    vocab = getattr(getattr(model, "config", model), "vocab_size", None) or 1000
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def check_seq_fits(model, seq: int, what: str = "--seq") -> None:
    """A sequence longer than the positions of `model` (or a model config) fails deep in capture: say so first."""
    from zqcompile.errors import InputError
    limit = getattr(getattr(model, "config", model), "max_position_embeddings", None)
    if limit and seq > limit:
        raise InputError(f"{what} {seq} is longer than the model's context ({limit} positions); "
                         f"use at most {limit}")


def cmd_compile(args) -> int:
    from dataclasses import replace

    from zqcompile.config import AccuracyBudget, get_config, with_attention
    from zqcompile.errors import InputError
    from zqcompile.export.compressed_tensors import WHAT, check_exportable, export_compressed_tensors, folder_bytes
    from zqcompile.export.compressed_tensors_import import load_compressed_tensors
    from zqcompile.files import Staged, check_output_dir, check_output_file
    from zqcompile.graph_dump import check_dump_dir, stage_dump
    from zqcompile.checkpoint import has_safetensors
    from zqcompile.models import is_compressed_tensors, load_model, read_config, resolve
    from zqcompile.streaming import why_not_streamable
    from zqcompile.runtime.engine import is_engine_file
    as_ct = args.format == "compressed-tensors"
    if as_ct and not args.out:
        raise InputError("--format compressed-tensors writes a folder: give it with --out DIR")
    if args.out:
        check_output_dir(args.out, WHAT) if as_ct else check_output_file(args.out, "engine", replaceable=is_engine_file)
    if args.dump:
        check_dump_dir(args.dump)
    path = os.path.abspath(resolve(args.model))
    imported = is_compressed_tensors(path)
    if imported and args.config is not None:
        raise InputError(f"{args.model} is a compressed-tensors checkpoint: its quantization_config decides every "
                         f"layer's scheme (its stored weights run as they are); drop --config {args.config}")
    cfg = None if imported else get_config(args.config or "w8a8")  # a bad preset name fails before the model loads
    if as_ct and cfg is not None:
        check_exportable(cfg)
    if imported and args.accuracy_budget is not None:
        raise InputError(f"{args.model} is a compressed-tensors checkpoint: its stored weights run as they are; "
                         f"drop --accuracy-budget (or compile the float model with it)")
    if imported and args.attention:
        raise InputError(f"{args.model} is a compressed-tensors checkpoint: its quantization_config decides the "
                         f"scheme; drop --attention (or compile the float model with it)")
    if args.attention:
        if as_ct:
            raise InputError("--attention has no compressed-tensors form (a Hugging Face model runs float "
                             "attention): drop it, or write a zqcompile engine (--format zq)")
        cfg = with_attention(cfg, args.attention, args.attention_scales)
    if args.accuracy_budget is not None:  # in the config, as zq.compile(accuracy_budget=) puts it
        cfg = replace(cfg, accuracy_budget=AccuracyBudget(budget=args.accuracy_budget))
    import torch
    device, dtype = _device(args.device), getattr(torch, args.dtype or "float32")
    calib_text = _calibration_text(args)
    # a safetensors folder is streamed block by block, unless what the config calibrates needs the whole model
    stream = not imported and not args.in_memory and has_safetensors(path)
    why = why_not_streamable(cfg) if stream else None
    if why:
        print(f"zqcompile compile: config {cfg.name!r} {why}: loading the whole model (not streaming the folder)",
              file=sys.stderr)
        stream = False
    import zqcompile as zq
    from zqcompile.api import _compile_checked
    generation = False if args.no_generation else zq.CacheSpec(args.max_batch, args.max_cache_len, args.kv_cache)
    if imported:  # its stored weights and scales, as they are
        model, cfg, stored = load_compressed_tensors(path)
        check_seq_fits(model, args.seq)
        t0 = time.perf_counter()
        engine = _compile_checked(model.to(device), (example_ids(model, args.batch, args.seq).to(device),), cfg,
                                  dump_dir=None, lkd=None, calibration_data=None, example_kwargs=None,
                                  generation=generation, stored_weights=stored, source=path)
    elif stream:  # the float model is never in memory
        config = read_config(path)
        check_seq_fits(config, args.seq)
        t0 = time.perf_counter()
        engine = zq.compile_folder(path, (example_ids(config, args.batch, args.seq).to(device),), config=cfg,
                                   dtype=dtype, generation=generation)
    else:
        model = load_model(args.model, dtype=dtype).to(device)
        check_seq_fits(model, args.seq)
        calibration = _calibration_data(args, calib_text, model) if calib_text is not None else None
        t0 = time.perf_counter()
        engine = zq.compile(model, (example_ids(model, args.batch, args.seq).to(device),), cfg,
                            generation=generation, calibration_data=calibration)
        engine.record.source = path
    print(engine.report())
    how = " (streamed block by block from the folder)" if stream else ""
    print(f"\ncompiled in {time.perf_counter() - t0:.1f} s{how}")
    with Staged() as outputs:  # the engine (or folder) and the dump go in place together, at the end
        if args.out and not as_ct:
            engine.write_to(outputs.file(args.out, "engine", replaceable=is_engine_file))
        if args.dump:
            staged = stage_dump(engine, args.dump)
            outputs.action(staged.commit, staged.discard)
        if as_ct:
            export_compressed_tensors(engine, args.out, dtype=args.dtype)  # atomic; before the dump is put in place
        outputs.commit()
    if args.out and as_ct:
        print(f"wrote {args.out}/ ({folder_bytes(args.out) / 2**20:.1f} MiB, compressed-tensors)")
    elif args.out:
        print(f"saved {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB)")
    if args.dump:
        print(f"graph dumps in {args.dump}/")
    return 0


def _calibration_text(args) -> str | None:
    from zqcompile.cli.eval import _read_text
    from zqcompile.errors import InputError
    if args.accuracy_budget is not None and not args.calib_text:
        raise InputError("--accuracy-budget measures perplexity on calibration text: give --calib-text FILE "
                         "(text like what the model will serve)")
    return _read_text(args.calib_text, "--calib-text") if args.calib_text else None


def _calibration_data(args, text: str, model) -> list[tuple]:
    """Windows of --seq tokens of the calibration text (at most 4), tokenized with the model's tokenizer."""
    from zqcompile.accuracy.eval import tokenize_text
    from zqcompile.errors import InputError
    from zqcompile.models import load_tokenizer
    ids = tokenize_text(load_tokenizer(args.model), text)
    windows = [(c.view(1, -1),) for c in ids.split(args.seq) if c.numel() == args.seq][:4]
    if not windows:
        raise InputError(f"--calib-text {args.calib_text} has {ids.numel()} tokens, fewer than one window of "
                         f"--seq {args.seq}: use a longer text or a smaller --seq")
    return windows


_DTYPES = ("float32", "float16", "bfloat16")


def _device(text: str):
    """--device as a torch.device, checked before anything loads."""
    import torch
    from zqcompile.errors import InputError
    try:
        device = torch.device(text)
    except RuntimeError:
        raise InputError(f"--device {text!r} is not a device; use cpu or cuda (cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {text}: this machine has no CUDA device; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {text}: zqcompile compiles for cpu or cuda")
    return device


def cmd_report(args) -> int:
    import zqcompile as zq
    print(zq.load(args.engine).report())
    return 0


def add_compile_commands(sub) -> None:
    from zqcompile.cli.main import budget_fraction, positive_int
    c = sub.add_parser("compile", help="compile a model folder / .gguf / packaged model name")
    c.add_argument("model", help="Hugging Face folder (a safetensors one is streamed block by block; a "
                                 "compressed-tensors one runs its stored weights), .gguf file, or 'minilm' / 'smollm2'")
    c.add_argument("--config", default=None, help="preset (default w8a8): w8a8, w8a8-fws, w4/8a8, w4/8a16, w8a8/16, "
                                                  "w8a16, ptq-static, fp8, w8a8-fp8act, none")
    c.add_argument("-o", "--out", help="write the engine here (e.g. model.zq); an existing engine there is replaced")
    c.add_argument("--format", choices=("zq", "compressed-tensors"), default="zq",
                   help="what --out is: a zqcompile engine (zq), or a compressed-tensors Hugging Face folder (new or "
                        "empty) for transformers / vLLM")
    c.add_argument("--dump", help="write per-pass graph dumps into this folder (new, empty, or an earlier dump)")
    c.add_argument("--batch", type=positive_int, default=2, help="example batch size (the engine takes any)")
    c.add_argument("--seq", type=positive_int, default=32, help="example sequence length (the engine takes any)")
    c.add_argument("--device", default="cpu", help="compile for this device: cpu (default) or cuda[:N]")
    c.add_argument("--dtype", choices=_DTYPES, default=None,
                   help="float dtype the model is loaded and compiled in (default float32); a compressed-tensors "
                        "folder's float tensors are written in it")
    c.add_argument("--in-memory", action="store_true",
                   help="load the whole model first (a safetensors folder is otherwise streamed block by block, "
                        "unless the config calibrates through the whole model: w8a8-fws, ptq-static, "
                        "--accuracy-budget)")
    c.add_argument("--calib-text", default=None, metavar="PATH",
                   help="calibration text (ptq-static ranges, w8a8-fws feature scales, --accuracy-budget)")
    c.add_argument("--attention", choices=["int8", "fp8", "int8-fp8"], default=None,
                   help="also quantize the attention products Q.K^T and P.V (ZeroQuant-HERO; int8-fp8: P.V in FP8)")
    c.add_argument("--attention-scales", choices=["head", "token"], default="token",
                   help="--attention's scales: per token for Q / K and per channel for V (default), or per head")
    c.add_argument("--accuracy-budget", type=budget_fraction, default=None, metavar="PCT",
                   help="feature-wise scales first, then the fewest GEMMs in FP16 for which the expected "
                        "perplexity increase on --calib-text (exp of the next-token KL to the float model) stays "
                        "within PCT (e.g. 1%%) (causal LMs)")
    g = c.add_argument_group("generation (causal LMs: prefill/decode graphs saved with the engine)")
    g.add_argument("--no-generation", action="store_true", help="build no generation graphs (faster compile)")
    g.add_argument("--max-batch", type=positive_int, default=8, help="largest batch engine.generate takes")
    g.add_argument("--max-cache-len", type=positive_int, default=512, help="prompt + new tokens the KV cache holds")
    g.add_argument("--kv-cache", choices=("model", "int8"), default="model", help="KV-cache storage")
    c.set_defaults(fn=cmd_compile)
    r = sub.add_parser("report", help="print the report of a saved engine")
    r.add_argument("engine")
    r.set_defaults(fn=cmd_report)
