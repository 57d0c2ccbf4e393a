"""The static KV cache and the capture of a causal LM's PREFILL and DECODE graphs around it.

Layout, per decoder layer i (module buffers of the captured graphs, one set shared by both graphs):
`k_cache_i`, `v_cache_i` of shape [max_batch, num_kv_heads, max_cache_len, head_dim] in the model dtype, or
int8 with `k_scale_i`, `v_scale_i` fp32 [max_batch, num_kv_heads, max_cache_len, 1] (one scale per token per
head: the same per-row rule as ZeroQuant's token-wise activations, from ops/quant_math). Slot t of row b holds
the token at cache position t; a left-padded prompt fills slots 0..S-1 (pads first), generated token n goes to
slot S+n. `kv_mask` [batch, max_cache_len] marks the valid slots; positions come from the mask, so padded rows
get the same positions as their unpadded selves. The cache is written with `index_copy_` on a slice of the
buffer, which torch.export keeps as an in-place op (the passes' DCE keeps it: the op mutates its input).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx, nn
from torch.export import Dim
from transformers.cache_utils import Cache

from zqcompile.generation.masks import MaskLayout
from zqcompile.capture import CaptureError, _describe_capture_failure, export_dynamic, unlift
from zqcompile.ops import quant_math as qm

KVDtype = Literal["model", "int8"]
CACHE_PREFIXES = ("k_cache_", "v_cache_", "k_scale_", "v_scale_")


@dataclass(frozen=True)
class CacheSpec:
    """How big the preallocated cache is. max_cache_len bounds prompt + new tokens (the engine's context)."""

    max_batch: int = 8
    max_cache_len: int = 512
    kv_dtype: KVDtype = "model"

    def __post_init__(self) -> None:
        from zqcompile.errors import ConfigError
        for name, low in (("max_batch", 1), ("max_cache_len", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"CacheSpec.{name} must be an integer >= {low}, got {v!r}")
        if self.kv_dtype not in ("model", "int8"):
            raise ConfigError(f"CacheSpec.kv_dtype must be 'model' or 'int8', got {self.kv_dtype!r}")

    @property
    def buckets(self) -> tuple[int, ...]:
        """Batch sizes with one decode CUDA graph each: powers of two up to max_batch (and max_batch)."""
        out, b = [], 1
        while b < self.max_batch:
            out.append(b)
            b *= 2
        return tuple(out + [self.max_batch])


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    max_positions: int

    @staticmethod
    def of(model: nn.Module) -> "KVShape":
        c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return KVShape(c.num_hidden_layers, kv, head_dim, int(getattr(c, "max_position_embeddings", 0) or 2048))


def allocate_cache(shape: KVShape, spec: CacheSpec, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    dims = (spec.max_batch, shape.kv_heads, spec.max_cache_len, shape.head_dim)
    out = {}
    for i in range(shape.layers):
        for kv in ("k", "v"):
            if spec.kv_dtype == "int8":
                out[f"{kv}_cache_{i}"] = torch.zeros(dims, dtype=torch.int8, device=device)
                out[f"{kv}_scale_{i}"] = torch.zeros((*dims[:3], 1), dtype=torch.float32, device=device)
            else:
                out[f"{kv}_cache_{i}"] = torch.zeros(dims, dtype=dtype, device=device)
    return out


def cache_kwarg(model: nn.Module) -> str:
    """The keyword a Hugging Face causal LM takes its Cache under: `cache` from transformers 5.18,
    `past_key_values` before (an unknown keyword is swallowed by **kwargs, and the model then builds its own
    dynamic cache: the graph would attend over the prompt only)."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise CaptureError(f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`: "
                       "zqcompile's KV cache cannot be passed to it")


class _SlotCache(Cache):
    """Hugging Face Cache whose update writes the new keys/values at `slots` of the owner's buffers."""

    def __init__(self, owner: "CachedLM", slots: torch.Tensor):
        super().__init__(layers=[])
        self.owner, self.slots = owner, slots

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        o, b = self.owner, key_states.shape[0]
        return o.write(layer_idx, "k", key_states, self.slots, b), o.write(layer_idx, "v", value_states, self.slots, b)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class CachedLM(nn.Module):
    """forward(input_ids, position_ids, cache_position, kv_mask) -> logits of the last position [B, 1, V],
    reading and writing the static cache held as this module's buffers."""

    def __init__(self, model: nn.Module, cache: dict[str, torch.Tensor], spec: CacheSpec):
        super().__init__()
        self.model = model
        self.int8 = spec.kv_dtype == "int8"
        self.max_cache_len = spec.max_cache_len
        self.cache_kwarg = cache_kwarg(model)
        self.mask_layout = MaskLayout.of(model)
        self.mask_dtype = next(model.parameters()).dtype  # an eager model's additive mask
        for name, t in cache.items():
            self.register_buffer(name, t, persistent=False)

    def write(self, layer: int, kv: str, new: torch.Tensor, slots: torch.Tensor, batch) -> torch.Tensor:
        cache = getattr(self, f"{kv}_cache_{layer}")
        if not self.int8:
            cache[:batch].index_copy_(2, slots, new.to(cache.dtype))
            return cache[:batch]
        scale = getattr(self, f"{kv}_scale_{layer}")
        q, s = qm.quantize_per_token(new)
        cache[:batch].index_copy_(2, slots, q)
        scale[:batch].index_copy_(2, slots, s)
        return qm.dequantize_rows(cache[:batch], scale[:batch], new.dtype)

    def forward(self, input_ids, position_ids, cache_position, kv_mask):
        # Hugging Face takes a 4D mask as given: the sliding / chunked layers' windows are in it (cache_masks)
        masks = self.mask_layout.masks(kv_mask, cache_position, self.mask_dtype)
        cache = {self.cache_kwarg: _SlotCache(self, cache_position)}
        out = self.model(input_ids=input_ids, attention_mask=masks, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, **cache)
        return out.logits


def example_inputs(phase: str, spec: CacheSpec, vocab: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Inputs to capture with (batch and prompt >= 2: torch.export specialises size-1 dims)."""
    b = min(2, spec.max_batch)
    s = min(8, spec.max_cache_len - 1) if phase == "prefill" else 1
    start = 0 if phase == "prefill" else s
    ids = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(0)).to(device)
    pos = torch.arange(start, start + s, device=device).expand(b, s).contiguous()
    kv_mask = torch.zeros(b, spec.max_cache_len, dtype=torch.long, device=device)
    kv_mask[:, :start + s] = 1
    return ids, pos, torch.arange(start, start + s, device=device), kv_mask


def phase_dynamic_shapes(phase: str, spec: CacheSpec) -> tuple:
    """Dynamic dims of (input_ids, position_ids, cache_position, kv_mask): prefill has dynamic batch and prompt
    length, decode one token and dynamic batch (its CUDA graphs pick static batch buckets later)."""
    batch = Dim("batch", min=1, max=spec.max_batch) if spec.max_batch > 1 else Dim.STATIC
    if phase == "prefill":
        seq = Dim("prompt", min=1, max=spec.max_cache_len - 1)
        return {0: batch, 1: seq}, {0: batch, 1: seq}, {0: seq}, {0: batch}
    return {0: batch}, {0: batch}, None, {0: batch}


def capture_phase(wrapper: CachedLM, phase: str, spec: CacheSpec, vocab: int) -> tuple[fx.GraphModule, tuple]:
    """torch.export the wrapper around the cache for one phase (prefill or decode)."""
    device = next(wrapper.model.parameters()).device
    args = example_inputs(phase, spec, vocab, device)
    try:
        ep = export_dynamic(wrapper.eval(), args, phase_dynamic_shapes(phase, spec))
    except Exception as e:  # noqa: BLE001 - re-raised naming the module that failed
        raise CaptureError(f"{phase} graph: " + _describe_capture_failure(wrapper.model, e)) from e
    return unlift(ep), args


def is_cache_buffer(name: str) -> bool:
    """A KV-cache buffer (or its INT8 scales): state, allocated at load instead of stored."""
    return name.startswith(CACHE_PREFIXES)


def cache_bytes(graph: fx.GraphModule) -> int:
    """Bytes of the KV cache (and its INT8 scales) a prefill or decode graph holds."""
    return sum(t.numel() * t.element_size() for n, t in graph.named_buffers() if is_cache_buffer(n.rsplit(".", 1)[-1]))
