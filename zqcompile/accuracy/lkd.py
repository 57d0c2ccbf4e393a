"""Layer-by-layer knowledge distillation (ZeroQuant Sec. 4.2, Eq. 1), tuning the fp weights of a model so
that each transformer block, once quantized, reproduces its own full-precision output.

Target of block k: the ORIGINAL block k on the outputs of the original blocks 1..k-1 (produced on the fly and
kept on CPU; block 1's inputs are captured with a forward pre-hook, so whatever positional embeddings or masks
the model passes its blocks as args/kwargs are reused as-is). Student: a fake-quantized copy
(`zqcompile.accuracy.fakequant`, the engine's quantizers with a straight-through estimator) fed, by default
(`student_input="quantized"`), what the already tuned quantized blocks 1..k-1 give, so it also learns to undo
their error (OmniQuant's setup; "fp" feeds it the teacher's input). It minimises MSE(student, target) with Adam
over block k's parameters (`lr`, cosine decay) and one clipping factor per INT weight group (`clip_lr`; OmniQuant's
learnable weight clipping): the tuned fp weights, clamped to the learned clipping so that the engine's max-based
scales are the learned ones, are written back into block k when they lower the block's loss. Only one extra block
is ever in memory. The model is modified IN PLACE (and returned); the quantized engine is then built from the
tuned weights as usual. Uniform random ids get gentler settings by default (config.LKD_TUNING: lr 1e-4
constant, no clipping, fp inputs): tuned as hard as text, the blocks fit hidden states real text never gives.
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from zqcompile.config import ConfigError, ConfigWarning, LKDConfig, QuantConfig, get_config
from zqcompile.accuracy.fakequant import calibrate_static, fake_quant_modules, fake_quantize, remove_fake_quant
from zqcompile.generation.generator import is_causal_lm

# Where the usual Hugging Face families keep their transformer blocks (checked before the generic search).
KNOWN_BLOCK_LISTS = ("model.layers", "model.decoder.layers", "transformer.h", "encoder.layer",
                     "bert.encoder.layer", "gpt_neox.layers", "transformer.layers", "layers", "h")


@dataclass(frozen=True)
class BlockStats:
    fqn: str
    loss_before: float  # mean MSE over the LKD data, quantized student vs fp teacher, before tuning
    loss_after: float  # after tuning (== loss_before when the tuning was not kept)
    seconds: float
    kept: bool = True  # False: tuning did not lower the loss on the LKD data, block k left unchanged


class _StopForward(Exception):
    pass


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks: a known HF path, else the ModuleList of identical modules
    holding the most parameters."""
    for path in KNOWN_BLOCK_LISTS:
        try:
            m = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(m, nn.ModuleList) and len(m):
            return path, m
    best, best_n = None, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1:
            n = sum(p.numel() for p in m.parameters())
            if n > best_n:
                best, best_n = (name, m), n
    if best is None:
        raise ValueError(f"LKD: found no ModuleList of transformer blocks in {type(model).__name__}")
    return best


def max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(cfg, attr, None), int):
            return getattr(cfg, attr)
    return None


def lkd_batches(model: nn.Module, lkd: LKDConfig, tokenizer=None) -> list[torch.Tensor]:
    """LKD data -> a list of LongTensor [batch_size, seq_len] batches (at most lkd.num_batches); seq_len is
    capped at the model's context length."""
    g = torch.Generator().manual_seed(lkd.seed)
    data = resolved_data(model, lkd)
    lkd = lkd.resolved_for(data)
    lkd = replace(lkd, seq_len=min(lkd.seq_len, max_positions(model) or lkd.seq_len))
    if isinstance(data, str) and data == "random":
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if not vocab:
            raise ConfigError("LKD data='random' needs model.config.vocab_size")
        # Uniform random token ids: the paper's data-free variant (Table 10).
        return [torch.randint(0, vocab, (lkd.batch_size, lkd.seq_len), generator=g) for _ in range(lkd.num_batches)]
    if isinstance(data, str) and data == "generated":
        return generated_batches(model, lkd, g)
    if isinstance(data, str):
        if tokenizer is None:
            raise ConfigError("LKD data given as text needs the model's tokenizer: run_lkd(..., tokenizer=tok)")
        ids = torch.tensor(tokenizer(data, add_special_tokens=False)["input_ids"], dtype=torch.long)
        per_batch = lkd.batch_size * lkd.seq_len
        n = min(lkd.num_batches, ids.numel() // per_batch)
        if n < 1:
            raise ConfigError(f"LKD text has {ids.numel()} tokens; one batch needs {per_batch} "
                              f"(batch_size={lkd.batch_size} x seq_len={lkd.seq_len})")
        return [ids[i * per_batch:(i + 1) * per_batch].view(lkd.batch_size, lkd.seq_len) for i in range(n)]
    if isinstance(data, (list, tuple)) and data and all(isinstance(b, torch.Tensor) for b in data):
        return [b if b.dim() == 2 else b.view(1, -1) for b in data][: lkd.num_batches]
    raise ConfigError("LKDConfig.data must be 'random', a text string, or a list of LongTensor token batches")


def resolved_data(model: nn.Module, lkd: LKDConfig) -> object:
    """lkd.data, with "auto" made "generated" for a causal LM (uniform random ids hurt the real SmolLM2), else
    "random"."""
    if isinstance(lkd.data, str) and lkd.data == "auto":
        return "generated" if is_causal_lm(model) else "random"
    return lkd.data


@torch.no_grad()
def generated_batches(model: nn.Module, lkd: LKDConfig, g: torch.Generator) -> list[torch.Tensor]:
    """Data-free LKD data sampled from the fp model itself (LLM-QAT's data-free generation): each sequence starts
    from one uniform random token and continues by sampling the model's next-token distribution (lkd.temperature,
    lkd.top_p), so the blocks see hidden states like those of real text, which uniform random ids do not give."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not is_causal_lm(model) or not vocab:
        raise ConfigError(f"LKD data='generated' samples from a causal LM; {type(model).__name__} is not one: "
                          f"use data='random' or give token batches")
    dev = next(model.parameters()).device
    eos = getattr(model.config, "eos_token_id", None)
    pad = eos[0] if isinstance(eos, (list, tuple)) else (eos if eos is not None else 0)
    out = []
    for _ in range(lkd.num_batches):
        first = torch.randint(0, vocab, (lkd.batch_size, 1), generator=g).to(dev)
        seq = model.generate(first, attention_mask=torch.ones_like(first), do_sample=True,
                             temperature=lkd.temperature, top_k=0, top_p=lkd.top_p, max_new_tokens=lkd.seq_len - 1,
                             min_new_tokens=lkd.seq_len - 1, pad_token_id=pad)
        out.append(seq[:, :lkd.seq_len].cpu())
    return out


def _map_tensors(x: Any, fn) -> Any:
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_map_tensors(v, fn) for v in x)
    if isinstance(x, dict):
        return {k: _map_tensors(v, fn) for k, v in x.items()}
    return x


def capture_block_inputs(model: nn.Module, first_block: nn.Module, batch: torch.Tensor) -> tuple[tuple, dict]:
    """(args, kwargs) the model passes its first block for `batch`, moved to CPU; the forward stops there."""
    seen: dict[str, Any] = {}

    def hook(_mod, args, kwargs):
        seen["args"], seen["kwargs"] = _map_tensors((args, kwargs), lambda t: t.detach().cpu())
        raise _StopForward

    h = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    dev = next(model.parameters()).device
    try:
        try:
            model(batch.to(dev), use_cache=False)
        except TypeError:
            model(batch.to(dev))
    except _StopForward:
        pass
    finally:
        h.remove()
    if "args" not in seen:
        raise RuntimeError("LKD: the model's forward never reached its first transformer block")
    return seen["args"], seen["kwargs"]


def _block_out(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _call(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict, device) -> torch.Tensor:
    a, kw = _map_tensors((args[1:], kwargs), lambda t: t.to(device))
    return _block_out(block(hidden.to(device), *a, **kw))


def _mean_loss(student: nn.Module, inputs, targets, ctx, device) -> float:
    with torch.no_grad():
        return sum(float(nn.functional.mse_loss(_call(student, x, *c, device), t.to(device)))
                   for x, t, c in zip(inputs, targets, ctx)) / len(inputs)


def _student(block: nn.Module, config: QuantConfig, fqn: str, hidden, ctx, device) -> nn.Module:
    """A fake-quantized copy of `block` (static activation ranges calibrated on its inputs)."""
    student = fake_quantize(copy.deepcopy(block), config, prefix=fqn)
    if config.uses_static_activations:
        calibrate_static(student, list(zip(hidden, ctx)), forward=lambda xc: _call(student, xc[0], *xc[1], device))
    return student


def _optimizer(student: nn.Module, lkd: LKDConfig) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    """Adam over the block's own parameters (lr) and, with clip_lr > 0, one clipping factor per INT weight
    group (clip_lr); returns the optimizer and the clipping parameters (projected to [clip_min, 1])."""
    clips = []
    if lkd.clip_lr > 0:
        clips = [m.learn_clipping() for m in fake_quant_modules(student) if m.scheme.weight.dtype != "fp8"]
    clip_ids = {id(c) for c in clips}
    weights = [p for p in student.parameters() if p.requires_grad and id(p) not in clip_ids]
    groups = [{"params": weights, "lr": lkd.lr}] + ([{"params": clips, "lr": lkd.clip_lr}] if clips else [])
    return torch.optim.Adam(groups), clips


def _tune(student: nn.Module, inputs, targets, ctx, lkd: LKDConfig, device) -> None:
    opt, clips = _optimizer(student, lkd)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(lkd.steps, 1))
             if lkd.schedule == "cosine" else None)
    for step in range(lkd.steps):
        i = step % len(inputs)
        loss = nn.functional.mse_loss(_call(student, inputs[i], *ctx[i], device), targets[i].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        with torch.no_grad():  # clipping never widens the engine's max-based scale (that would not bake)
            for c in clips:
                c.clamp_(lkd.clip_min, 1.0)


def run_lkd_with_stats(model: nn.Module, config: QuantConfig | str, lkd: LKDConfig,
                       tokenizer=None) -> tuple[nn.Module, list[BlockStats]]:
    """`run_lkd`, also returning loss before/after and runtime per block."""
    if lkd.loss != "mse":
        raise ConfigError(f"LKD loss {lkd.loss!r} is not implemented; use loss='mse' (the paper's Eq. 1)")
    config = get_config(config)
    data = resolved_data(model, lkd)
    lkd = lkd.resolved_for(data)
    if config.feature_scales is not None:
        warnings.warn(f"LKD tunes {config.name!r} without its feature-wise scales, which the compiler folds into the "
                      "tuned weights afterwards: the blocks it distilled are not exactly the ones compiled (learned "
                      "clipping does not carry over); compile without feature_scales for LKD's own accuracy",
                      ConfigWarning, stacklevel=2)
    torch.manual_seed(lkd.seed)
    prefix, blocks = find_blocks(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = lkd_batches(model, lkd, tokenizer)
    captured = [capture_block_inputs(model, blocks[0], b) for b in batches]
    hidden = [args[0] if args else kw.pop("hidden_states") for args, kw in captured]
    ctx = [(args if args else (None,), kw) for args, kw in captured]
    # student_input="quantized": block k's student sees what the tuned, quantized blocks 1..k-1 give
    # (the error it must undo); "fp": the fp teacher's input. The target is always the fp block on fp input.
    q_hidden = hidden
    stats: list[BlockStats] = []
    bar = _progress(len(blocks), lkd.progress)
    for k, block in enumerate(blocks):
        t0 = time.perf_counter()
        fqn = f"{prefix}.{k}"
        with torch.no_grad():  # teacher outputs: also the fp inputs of block k+1
            targets = [_call(block, x, *c, device).cpu() for x, c in zip(hidden, ctx)]
        inputs = q_hidden if lkd.student_input == "quantized" else hidden
        student = _student(block, config, fqn, inputs, ctx, device)
        before = _mean_loss(student, inputs, targets, ctx, device)
        _tune(student, inputs, targets, ctx, lkd, device)
        after = _mean_loss(student, inputs, targets, ctx, device)
        # Never make a block worse on the LKD data (a too-large lr, or W8 blocks whose error is already tiny).
        kept = after < before
        if kept:
            with torch.no_grad():
                block.load_state_dict(remove_fake_quant(student).state_dict())
        del student
        if lkd.student_input == "quantized" and k + 1 < len(blocks):
            tuned = _student(block, config, fqn, inputs, ctx, device)
            with torch.no_grad():
                q_hidden = [_call(tuned, x, *c, device).cpu() for x, c in zip(inputs, ctx)]
            del tuned
        hidden = targets
        stats.append(BlockStats(fqn, before, after if kept else before, time.perf_counter() - t0, kept))
        if bar is not None:
            note = "" if kept else " (not kept: tuning did not lower the loss)"
            bar.write(f"LKD {fqn}: mse {before:.4g} -> {after:.4g} ({stats[-1].seconds:.1f} s){note}")
            bar.update(1)
    if bar is not None:
        bar.close()
        bar.write(summary(stats))
    model.train(was_training)
    return model, stats


def summary(stats: list[BlockStats]) -> str:
    """One line: blocks tuned and kept, the mean ratio of block MSE after / before, total and per-block time."""
    ratios = [s.loss_after / s.loss_before for s in stats if s.loss_before > 0]
    total = sum(s.seconds for s in stats)
    mean = f"{sum(ratios) / len(ratios):.3f}" if ratios else "-"
    return (f"LKD: {sum(s.kept for s in stats)} of {len(stats)} blocks kept, block mse after / before {mean} "
            f"(mean), {total:.1f} s ({total / max(len(stats), 1):.1f} s per block)")


def run_lkd(model: nn.Module, config: QuantConfig | str, lkd: LKDConfig, tokenizer=None) -> nn.Module:
    """Tune `model`'s fp weights IN PLACE with LKD for `config`'s quantizers; returns the same model.

    `zq.compile(model, inputs, config, lkd=LKDConfig(...))` is `compile(run_lkd(model, config, lkd), ...)`.
    """
    return run_lkd_with_stats(model, config, lkd, tokenizer)[0]


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="LKD", unit="block")


__all__ = ["BlockStats", "find_blocks", "lkd_batches", "resolved_data", "run_lkd", "run_lkd_with_stats", "summary"]
