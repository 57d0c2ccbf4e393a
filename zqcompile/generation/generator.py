"""KV-cache generation for causal LMs: builds the PREFILL and DECODE graphs (each captured separately around
the static cache of kv_cache.py and run through the same quantization pass pipeline and config as the
engine), makes both graphs (and the engine's own full-sequence graph) share one copy of every quantized
weight and of the cache, and runs the token loop: prefill once, then one decode step per token, greedy or
seeded sampling, left-padded batches, EOS, streaming. On CUDA the decode step replays CUDA graphs
(decode_graphs.py) and the prefill one graph per prompt shape (backends/cuda_graphs.py); on CPU everything
runs the reference ops eagerly.

The graphs are built on the first `generate` (from the model the engine keeps only until then), so a
compile that is only used for `engine(...)` pays nothing for generation.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import fx, nn

from zqcompile import progress
from zqcompile.capture import InputError
from zqcompile.config import QuantConfig
from zqcompile.generation.kv_cache import (CACHE_PREFIXES, CachedLM, CacheSpec, KVShape, allocate_cache, capture_phase,
                       share_constants)
from zqcompile.generation.sampling import SamplingParams, select_next


@dataclass
class GenerationRecord:
    """What building the generation graphs did (shown by Generator.describe())."""

    spec: CacheSpec
    seconds: float = 0.0
    shared: dict[str, tuple[int, int]] = field(default_factory=dict)  # pair -> (shared, kept separate)
    cache_bytes: int = 0
    weight_bytes: int = 0


class Generator:
    """Runs generation with a compiled prefill/decode pair. Not thread-safe: one cache per generator."""

    def __init__(self, prefill: fx.GraphModule, decode: fx.GraphModule, spec: CacheSpec, shape: KVShape,
                 record: GenerationRecord, pad_token_id: int):
        self.prefill, self.decode = prefill, decode
        self.spec, self.shape, self.record = spec, shape, record
        self.pad_token_id = pad_token_id
        self._cuda_decode = None
        self._cuda_prefill = None

    @property
    def device(self) -> torch.device:
        return self.decode.k_cache_0.device

    # ---- persistence (Engine.save / zqcompile.load) -----------------------------------------------------
    def export_programs(self) -> dict[str, torch.export.ExportedProgram]:
        """The prefill and decode graphs as exported programs (each holds its own copy of the constants)."""
        from zqcompile.capture import export_dynamic
        from zqcompile.generation.kv_cache import example_inputs, phase_dynamic_shapes
        out = {}
        for phase, gm in (("prefill", self.prefill), ("decode", self.decode)):
            args = example_inputs(phase, self.spec, 2, self.device)
            out[phase] = export_dynamic(gm, args, phase_dynamic_shapes(phase, self.spec))
        return out

    def meta(self) -> dict:
        return {"spec": asdict(self.spec), "shape": asdict(self.shape), "pad_token_id": self.pad_token_id}

    @staticmethod
    def from_programs(prefill: fx.GraphModule, decode: fx.GraphModule, meta: dict,
                      share_with: fx.GraphModule | None = None) -> Generator:
        """Rebuild a saved generator: one copy of the weights and the cache again, as build_generator made."""
        spec, shape = CacheSpec(**meta["spec"]), KVShape(**meta["shape"])
        record = GenerationRecord(spec, shared=tie_constants(prefill, decode, share_with),
                                  cache_bytes=cache_bytes(decode))
        return Generator(prefill, decode, spec, shape, record, int(meta["pad_token_id"]))

    def to(self, device: torch.device | str, share_with: fx.GraphModule | None = None) -> Generator:
        """Move both graphs (and the cache) to `device`, keeping one copy of every shared constant."""
        self.prefill.to(device)
        self.decode.to(device)
        tie_constants(self.prefill, self.decode, share_with)
        self._cuda_decode = self._cuda_prefill = None
        return self

    def describe(self) -> str:
        r = self.record
        kv = "INT8 per-token-per-head" if self.spec.kv_dtype == "int8" else "model dtype"
        pairs = ", ".join(f"{k}: {s} shared / {n} separate" for k, (s, n) in r.shared.items())
        return (f"generation: prefill + decode graphs built in {r.seconds:.1f} s; KV cache {kv}, "
                f"{self.spec.max_batch} x {self.spec.max_cache_len} slots, {r.cache_bytes / 2**20:.1f} MiB; "
                f"constants {pairs}")

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
                             f"the batch, or call engine.prepare_generation(max_batch={b}) before generating")
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
        if self.device.type != "cuda":
            return self.prefill(ids, pos, cache_position, kv_mask)
        if self._cuda_prefill is None:
            from zqcompile.runtime.cuda_graphs import ShapeBucketedGraphs
            self._cuda_prefill = ShapeBucketedGraphs(self.prefill, max_graphs=16)
        return self._cuda_prefill(ids, pos, cache_position, kv_mask)

    def _decode_step(self, ids, pos, cache_position, kv_mask) -> torch.Tensor:
        if self.device.type != "cuda":
            return self.decode(ids, pos, cache_position, kv_mask)
        if self._cuda_decode is None:
            from zqcompile.runtime.decode_graphs import CudaGraphDecode
            self._cuda_decode = CudaGraphDecode(self.decode, self.spec.buckets)
        return self._cuda_decode(ids, pos, cache_position, kv_mask)


def tie_constants(prefill: fx.GraphModule, decode: fx.GraphModule,
                  share_with: fx.GraphModule | None = None) -> dict[str, tuple[int, int]]:
    """One copy of every constant the graphs have in common (and of the cache): prefill takes the engine
    graph's tensors, decode the prefill's. Returns {pair: (shared, kept separate)} for the record."""
    shared = {}
    if share_with is not None:
        shared["prefill<-engine"] = share_constants(prefill, share_with)
    shared["decode<-prefill"] = share_constants(decode, prefill)
    return shared


def cache_bytes(graph: fx.GraphModule) -> int:
    """Bytes of the KV cache (and its INT8 scales) a prefill or decode graph holds."""
    return sum(t.numel() * t.element_size() for n, t in graph.named_buffers() if n.startswith(CACHE_PREFIXES))


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face model with a generation head (GPT2LMHeadModel, LlamaForCausalLM, OPTForCausalLM...)."""
    can = getattr(model, "can_generate", None)
    return hasattr(model, "config") and callable(can) and bool(can())


def build_generator(model: nn.Module, cfg: QuantConfig, spec: CacheSpec,
                    share_with: fx.GraphModule | None = None) -> Generator:
    """Capture prefill and decode around one preallocated cache, quantize both with `cfg`, share constants."""
    from zqcompile.passes import GENERATION_PIPELINE, PassContext, run_pipeline
    t0 = time.perf_counter()
    shape = KVShape.of(model)
    if spec.max_cache_len > shape.max_positions:
        spec = CacheSpec(spec.max_batch, shape.max_positions, spec.kv_dtype)
    if spec.max_batch < 1 or spec.max_cache_len < 2:
        raise InputError(f"max_batch must be >= 1 and max_cache_len >= 2, got {spec}")
    param = next(model.parameters())
    cache = allocate_cache(shape, spec, param.dtype, param.device)
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    graphs = {}
    for phase in ("prefill", "decode"):
        bar, tick = progress.pass_bar(len(GENERATION_PIPELINE) + 2, f"{phase} graph ({cfg.name})")
        with bar:
            gm, args = capture_phase(CachedLM(model, cache, spec), phase, spec, vocab)
            tick("0_captured", gm)
            ctx = PassContext(cfg, args, [], max_seq=spec.max_cache_len)
            run_pipeline(gm, ctx, GENERATION_PIPELINE, on_pass=tick)
        graphs[phase] = gm
    record = GenerationRecord(spec, shared=tie_constants(graphs["prefill"], graphs["decode"], share_with),
                              cache_bytes=cache_bytes(graphs["decode"]))
    record.seconds = time.perf_counter() - t0
    gc = getattr(model, "generation_config", None)
    pad = getattr(gc, "pad_token_id", None)
    if pad is None:
        eos = getattr(gc, "eos_token_id", None)
        pad = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
    return Generator(graphs["prefill"], graphs["decode"], spec, shape, record, int(pad))
