"""KV-cache generation for causal LMs: the PREFILL and DECODE graphs (each captured around the static cache
of kv_cache.py and run through the same pass pipeline and config as the engine, with the engine's
SharedConstants, so all three graphs read one copy of every quantized weight) and the token loop: prefill
once, then one decode step per token, greedy or seeded sampling, left-padded batches, EOS, streaming. On CUDA
the decode step replays one CUDA graph per batch bucket and the prefill one per prompt shape (runtime/cuda_graphs.py);
on CPU everything runs the reference ops eagerly.

The graphs are built by `zq.compile` (for a cache given by `generation=CacheSpec(...)`), while the float
model is still there; the engine keeps no reference to it.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from zqcompile import progress
from zqcompile.capture import InputError
from zqcompile.config import QuantConfig
from zqcompile.generation.kv_cache import (CachedLM, CacheSpec, KVShape, allocate_cache, cache_bytes, capture_phase,
                                           example_inputs, phase_dynamic_shapes)
from zqcompile.generation.sampling import SamplingParams, select_next

if TYPE_CHECKING:
    from zqcompile.passes.constants import SharedConstants


@dataclass
class GenerationRecord:
    """What building the generation graphs did (shown by Generator.describe())."""

    spec: CacheSpec
    seconds: float = 0.0
    cache_bytes: int = 0


class Generator:
    """Runs generation with a compiled prefill/decode pair. Not thread-safe: one cache per generator."""

    def __init__(self, prefill: fx.GraphModule, decode: fx.GraphModule, spec: CacheSpec, shape: KVShape,
                 record: GenerationRecord, pad_token_id: int):
        self.prefill, self.decode = prefill, decode
        self.spec, self.shape, self.record = spec, shape, record
        self.pad_token_id = pad_token_id
        self._cuda_decode = None
        self._cuda_prefill = None
        self.cuda_graphs = True  # on a CUDA device, replay the prefill and decode steps as CUDA graphs

    @property
    def device(self) -> torch.device:
        return self.decode.k_cache_0.device

    # ---- persistence (Engine.save / zqcompile.load) -----------------------------------------------------
    def programs(self) -> dict:
        """The prefill and decode graphs with the inputs and dynamic dims to export them with."""
        from zqcompile.runtime.enginefile import Program
        return {phase: Program(gm, example_inputs(phase, self.spec, 2, self.device), phase_dynamic_shapes(phase, self.spec))
                for phase, gm in (("prefill", self.prefill), ("decode", self.decode))}

    def meta(self) -> dict:
        return {"spec": asdict(self.spec), "shape": asdict(self.shape), "pad_token_id": self.pad_token_id}

    @staticmethod
    def from_meta(prefill: fx.GraphModule, decode: fx.GraphModule, meta: dict) -> Generator:
        """A saved generator again (its graphs already share constants: zq.load binds them to one copy)."""
        spec, shape = CacheSpec(**meta["spec"]), KVShape(**meta["shape"])
        return Generator(prefill, decode, spec, shape, GenerationRecord(spec, cache_bytes=cache_bytes(decode)),
                         int(meta["pad_token_id"]))

    def reset_runners(self) -> None:
        """Forget the CUDA graphs (after the constants moved to another device)."""
        self._cuda_decode = self._cuda_prefill = None

    def describe(self) -> str:
        r = self.record
        kv = "INT8 per-token-per-head" if self.spec.kv_dtype == "int8" else "model dtype"
        built = f" built in {r.seconds:.1f} s" if r.seconds else ""
        return (f"prefill + decode graphs{built}, sharing the engine's constants; KV cache {kv}, batches up to "
                f"{self.spec.max_batch}, {self.spec.max_cache_len} tokens, {r.cache_bytes / 2**20:.1f} MiB")

    # ---- input checks (before any state changes) --------------------------------------------------------
    def check(self, ids: torch.Tensor, mask: torch.Tensor | None, max_new_tokens: int, p: SamplingParams) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32):
            raise InputError("input_ids must be an integer tensor [batch, prompt_len]")
        b, s = ids.shape
        if s < 1:
            raise InputError("input_ids has an empty prompt; give at least one token")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if b > self.spec.max_batch:
            raise InputError(f"batch {b} is larger than the largest batch bucket ({self.spec.max_batch}); split "
                             f"the batch, or compile with generation=zq.CacheSpec(max_batch={b}, ...)")
        if s + max_new_tokens > self.spec.max_cache_len:
            raise InputError(f"prompt ({s} tokens) + max_new_tokens ({max_new_tokens}) = {s + max_new_tokens} exceeds "
                             f"the engine's context of {self.spec.max_cache_len} tokens (KV-cache slots; the model allows "
                             f"{self.shape.max_positions}): shorten the prompt or lower max_new_tokens")
        if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, s)):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise InputError(f"attention_mask has shape {got}; it must match input_ids {(b, s)}")
        if mask is not None and bool((mask.sum(-1) == 0).any()):
            raise InputError("attention_mask has a row with no tokens; every prompt needs at least one")
        try:
            p.validate()
        except ValueError as e:
            raise InputError(str(e)) from None

    # ---- the token loop ---------------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                 params: SamplingParams, eos_token_id: int | list[int] | None, seed: int | None, streamer) -> torch.Tensor:
        self.check(input_ids, attention_mask, max_new_tokens, params)
        dev = self.device
        ids = input_ids.to(dev, torch.long)
        b, s = ids.shape
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(dev, torch.long)
        kv_mask = torch.zeros(b, self.spec.max_cache_len, dtype=torch.long, device=dev)
        kv_mask[:, :s] = mask
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []), device=dev)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        if streamer is not None:
            streamer.put(ids.cpu())
        out = [ids]
        with torch.no_grad():
            logits = self._prefill(ids, pos, torch.arange(s, device=dev), kv_mask)[:, -1]
            pos = pos[:, -1:]
            for t in range(max_new_tokens):
                tok = select_next(logits, params, gen)
                tok = torch.where(done, torch.full_like(tok, self.pad_token_id), tok)
                out.append(tok[:, None])
                if streamer is not None:
                    streamer.put(tok.cpu())
                if eos.numel():
                    done |= torch.isin(tok, eos)
                    if bool(done.all()):
                        break
                if t == max_new_tokens - 1:
                    break
                kv_mask[:, s + t] = 1
                pos = pos + 1
                logits = self._decode_step(tok[:, None], pos, torch.tensor([s + t], device=dev), kv_mask)[:, -1]
        if streamer is not None:
            streamer.end()
        return torch.cat(out, dim=1)

    def _prefill(self, ids, pos, cache_position, kv_mask) -> torch.Tensor:
        """On CUDA one graph per (batch, prompt length) replays the whole prefill (eager past 16 shapes)."""
        if self.device.type != "cuda" or not self.cuda_graphs:
            return _logits(self.prefill, ids, pos, cache_position, kv_mask)
        if self._cuda_prefill is None:
            from zqcompile.runtime.cuda_graphs import ShapeBucketedGraphs
            self._cuda_prefill = ShapeBucketedGraphs(lambda *a: _logits(self.prefill, *a), max_graphs=16)
        return self._cuda_prefill(ids, pos, cache_position, kv_mask)

    def _decode_step(self, ids, pos, cache_position, kv_mask) -> torch.Tensor:
        if self.device.type != "cuda" or not self.cuda_graphs:
            return _logits(self.decode, ids, pos, cache_position, kv_mask)
        if self._cuda_decode is None:
            from zqcompile.runtime.cuda_graphs import BatchBucketedGraphs
            # (ids, pos, cache_position, kv_mask): every input but the cache position has a batch dim, padded
            # rows attend to nothing (their kv_mask row is zero); the logits are a view of the graph's memory,
            # read before the next step
            self._cuda_decode = BatchBucketedGraphs(lambda *a: _logits(self.decode, *a), self.spec.buckets,
                                                    unbatched=(2,), zero_padding=(3,))
        return self._cuda_decode(ids, pos, cache_position, kv_mask)


def _logits(graph: fx.GraphModule, *inputs) -> torch.Tensor:
    """A prefill/decode graph returns (logits,), flat like every engine graph."""
    return graph(*inputs)[0]


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face model with a generation head (GPT2LMHeadModel, LlamaForCausalLM, OPTForCausalLM...)."""
    can = getattr(model, "can_generate", None)
    return hasattr(model, "config") and callable(can) and bool(can())


def build_generator(model: nn.Module, cfg: QuantConfig, spec: CacheSpec,
                    constants: SharedConstants | None = None, warn: bool = True,
                    weight_shards: dict | None = None, stored_weights: dict | None = None) -> Generator:
    """Capture prefill and decode around one preallocated cache and run the pipeline on both with `cfg`;
    `constants` (the engine's, when it compiles them) makes every graph read the same quantized weights;
    `weight_shards`: a tensor-parallel rank's slices of the full weights (zqcompile/parallel);
    `stored_weights` are the checkpoint's own quantized weights (PassContext.stored_weights)."""
    from zqcompile.passes import GENERATION_PIPELINE, PassContext, run_pipeline
    from zqcompile.passes.constants import SharedConstants
    from zqcompile.runtime.outputs import flatten_graph_outputs
    constants = constants if constants is not None else SharedConstants()
    t0 = time.perf_counter()
    shape = KVShape.of(model)
    if spec.max_cache_len > shape.max_positions:
        spec = CacheSpec(spec.max_batch, shape.max_positions, spec.kv_dtype)
    param = next(model.parameters())
    cache = allocate_cache(shape, spec, param.dtype, param.device)
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    graphs = {}
    for phase in ("prefill", "decode"):
        bar, tick = progress.pass_bar(len(GENERATION_PIPELINE) + 2, f"{phase} graph ({cfg.name})")
        with bar:
            gm, args = capture_phase(CachedLM(model, cache, spec), phase, spec, vocab)
            tick("0_captured", gm)
            flatten_graph_outputs(gm)  # (logits,): as every engine graph, a flat tuple
            ctx = PassContext(cfg, args, [], max_seq=spec.max_cache_len, constants=constants, warn=warn,
                              calibrate_feature_scales=False, weight_shards=weight_shards or {},
                              stored_weights=dict(stored_weights or {}))
            run_pipeline(gm, ctx, GENERATION_PIPELINE, on_pass=tick)
        graphs[phase] = gm
    record = GenerationRecord(spec, cache_bytes=cache_bytes(graphs["decode"]))
    record.seconds = time.perf_counter() - t0
    gc = getattr(model, "generation_config", None)
    pad = getattr(gc, "pad_token_id", None)
    if pad is None:
        eos = getattr(gc, "eos_token_id", None)
        pad = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
    return Generator(graphs["prefill"], graphs["decode"], spec, shape, record, int(pad))
