"""`zqcompile compile MODEL --config w8a8 --out m.zq --dump d/` and `zqcompile report m.zq`."""
from __future__ import annotations

import os
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
    from zqcompile.config import get_config
    from zqcompile.files import Staged, check_output_file
    from zqcompile.graph_dump import check_dump_dir, stage_dump
    from zqcompile.runtime.engine import is_engine_file
    if args.out:
        check_output_file(args.out, "engine", replaceable=is_engine_file)
    if args.dump:
        check_dump_dir(args.dump)
    cfg = get_config(args.config)  # a bad preset name fails before the model loads
    import torch
    device, dtype = _device(args.device), getattr(torch, args.dtype)
    import zqcompile as zq
    from zqcompile.checkpoint import has_safetensors
    from zqcompile.models import load_model, read_config, resolve
    path = resolve(args.model)
    stream = not args.in_memory and has_safetensors(path)
    generation = False if args.no_generation else zq.CacheSpec(args.max_batch, args.max_cache_len, args.kv_cache)
    if stream:  # block by block from the folder: the float model is never in memory
        from zqcompile.streaming import check_streamable
        check_streamable(cfg, "add --in-memory to load the whole model and compile it")
        config = read_config(path)
        check_seq_fits(config, args.seq)
        t0 = time.perf_counter()
        engine = zq.compile_folder(path, (example_ids(config, args.batch, args.seq).to(device),), config=cfg,
                                   dtype=dtype, generation=generation)
    else:
        model = load_model(args.model, dtype=dtype).to(device)
        check_seq_fits(model, args.seq)
        t0 = time.perf_counter()
        engine = zq.compile(model, (example_ids(model, args.batch, args.seq).to(device),), config=cfg,
                            generation=generation)
    print(engine.report())
    how = " (streamed block by block from the folder)" if stream else ""
    print(f"\ncompiled in {time.perf_counter() - t0:.1f} s{how}")
    with Staged() as outputs:  # the engine and the dump go in place together, at the end
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
    from zqcompile.cli.main import positive_int
    c = sub.add_parser("compile", help="compile a model folder / .gguf / packaged model name")
    c.add_argument("model", help="Hugging Face folder, .gguf file, or 'minilm' / 'smollm2'")
    c.add_argument("--config", default="w8a8", help="preset: w8a8, w4/8a8, w4/8a16, w8a8/16, w8a16, ptq-static, none")
    c.add_argument("-o", "--out", help="write the engine here (e.g. model.zq); an existing engine there is replaced")
    c.add_argument("--dump", help="write per-pass graph dumps into this folder (new, empty, or an earlier dump)")
    c.add_argument("--batch", type=positive_int, default=2, help="example batch size (the engine takes any)")
    c.add_argument("--seq", type=positive_int, default=32, help="example sequence length (the engine takes any)")
    c.add_argument("--device", default="cpu", help="compile for this device: cpu (default) or cuda[:N]")
    c.add_argument("--dtype", choices=_DTYPES, default="float32", help="float dtype of the weights")
    c.add_argument("--in-memory", action="store_true",
                   help="load the whole model first (a safetensors folder is otherwise streamed block by block; "
                        "w8a8-fws and ptq-static need this)")
    g = c.add_argument_group("generation (causal LMs: prefill/decode graphs saved with the engine)")
    g.add_argument("--no-generation", action="store_true", help="build no generation graphs (faster compile)")
    g.add_argument("--max-batch", type=positive_int, default=8, help="largest batch engine.generate takes")
    g.add_argument("--max-cache-len", type=positive_int, default=512, help="prompt + new tokens the KV cache holds")
    g.add_argument("--kv-cache", choices=("model", "int8"), default="model", help="KV-cache storage")
    c.set_defaults(fn=cmd_compile)
    r = sub.add_parser("report", help="print the report of a saved engine")
    r.add_argument("engine")
    r.set_defaults(fn=cmd_report)
