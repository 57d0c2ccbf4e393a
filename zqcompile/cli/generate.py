"""`zqcompile generate MODEL --config w8a8 --prompt "..." [--chat]`: compile a causal LM and stream its answer
to the terminal token by token (a Hugging Face TextStreamer fed by the engine's token loop). With `--tp N` under
`torchrun --nproc-per-node N -m zqcompile generate ...` every rank compiles its shard and runs the token loop
(the same tokens on every rank: the all-reduced logits are equal), and rank 0 alone prints."""
from __future__ import annotations

import argparse
import sys
import time


def encode_prompt(tok, prompt: str, chat: bool):
    import torch
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt")
        return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    return tok(prompt, return_tensors="pt")["input_ids"]


def check_context(model, prompt_tokens: int, new_tokens: int) -> None:
    """Prompt + new tokens must fit the model's positions: say so before compiling (tens of seconds)."""
    from zqcompile.capture import InputError
    from zqcompile.generation.kv_cache import KVShape
    limit = KVShape.of(model).max_positions
    if prompt_tokens + new_tokens > limit:
        raise InputError(f"the prompt is {prompt_tokens} tokens and --max-new-tokens {new_tokens} asks for "
                         f"{prompt_tokens + new_tokens} in all, more than the model's context of {limit}; "
                         f"shorten the prompt or lower --max-new-tokens to at most {max(limit - prompt_tokens, 0)}")


def cmd_generate(args) -> int:
    import zqcompile as zq
    from transformers import TextStreamer

    from zqcompile.config import get_config
    from zqcompile.models import load_model, load_tokenizer
    get_config(args.config)  # a bad preset name fails before the model loads
    lead = True  # the process that prints: the only one, or rank 0 of a tensor-parallel run
    tp = None
    if args.tp > 1:
        from zqcompile import progress
        from zqcompile.parallel.group import check_launch
        lead = check_launch(args.tp) == 0  # launched as asked, before the model loads
        tp = zq.TensorParallel(args.tp, device=args.device, timeout_s=args.tp_timeout)
        if not lead:
            progress.set_enabled(False)
    model, tok = load_model(args.model), load_tokenizer(args.model)
    if tp is None and args.device == "cuda":
        model = model.to("cuda")
    ids = encode_prompt(tok, args.prompt, args.chat)
    if ids.numel() == 0:
        from zqcompile.capture import InputError
        raise InputError(f"the prompt {args.prompt!r} encodes to no tokens with this tokenizer; give some text")
    check_context(model, ids.shape[1], args.max_new_tokens)
    t0 = time.perf_counter()
    engine = zq.compile(model, (ids.to(next(model.parameters()).device),), config=args.config,
                        generation=zq.CacheSpec(1, ids.shape[1] + args.max_new_tokens, args.kv_cache), tp=tp)
    say = (lambda text: print(text, file=sys.stderr)) if lead else (lambda text: None)  # noqa: E731
    say(f"[compiled {args.config} in {time.perf_counter() - t0:.1f} s"
        f"{f': {engine.record.tensor_parallel}, printing for all ranks' if tp else ''}]")
    t0 = time.perf_counter()
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if lead else None
    out = engine.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                          temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
                          eos_token_id=tok.eos_token_id, seed=args.seed, streamer=streamer)
    n = out.shape[1] - ids.shape[1]
    dt = time.perf_counter() - t0
    say(f"[{n} tokens in {dt:.1f} s, {n / dt:.1f} tokens/s]")
    return 0


def add_generate_command(subparsers: argparse._SubParsersAction) -> None:
    from zqcompile.cli.main import positive_float, positive_int
    g = subparsers.add_parser("generate", help="compile a causal LM and stream generated text")
    g.add_argument("model", help="Hugging Face folder, .gguf file, or 'smollm2'")
    g.add_argument("--config", default="w8a8", help="quantization preset (none = no quantization)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=positive_int, default=50)
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to the prompt")
    g.add_argument("--kv-cache", choices=("model", "int8"), default="model", help="KV-cache storage")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-k", type=int, default=0, help="0 = no top-k filtering")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the engine runs (with --tp: each rank on cuda:LOCAL_RANK, NCCL; cpu: gloo)")
    g.add_argument("--tp", type=positive_int, default=1, metavar="N",
                   help="tensor parallelism over N processes: launch with `torchrun --nproc-per-node N -m zqcompile "
                        "generate ... --tp N`; rank 0 prints")
    g.add_argument("--tp-timeout", type=positive_float, default=600.0, metavar="SECONDS",
                   help="how long a rank waits for the others (joining, any all-reduce) before it exits with an "
                        "error (default 600; it must cover the ranks' difference in compile time)")
    g.set_defaults(fn=cmd_generate)
