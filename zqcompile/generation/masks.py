"""Attention masks over the static KV cache of kv_cache.py, one per kind of attention layer.

Hugging Face uses a prepared 4D mask as given, so the prefill/decode graphs must build each layer's window
themselves, the way `masking_utils` does for generation: full causal; a sliding window, `kv > q - window` in
cache slots (`sliding_window_overlay`); chunks of `attention_chunk_size` slots counted from each row's first
real token (`chunked_overlay`). A model whose config lists `layer_types` takes {layer type: mask}
(`create_masks_for_generate`); any other model takes one mask for every layer. Masks are boolean
[batch, 1, query, max_cache_len], True = may attend, for SDPA; the eager attention adds its mask to the
scores, so it gets 0 / the dtype's min instead (`eager_mask`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zqcompile.capture import CaptureError

FULL, SLIDING, CHUNKED = "full_attention", "sliding_attention", "chunked_attention"


@dataclass(frozen=True)
class MaskLayout:
    """The kinds of attention a model's layers use, read once from its (text) config."""

    kinds: tuple[str, ...]
    per_layer_type: bool  # the model takes a dict keyed by layer type
    sliding_window: int | None = None
    chunk_size: int | None = None
    attn_implementation: str = "sdpa"

    @staticmethod
    def of(model: nn.Module) -> MaskLayout:
        c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        window, chunk = getattr(c, "sliding_window", None), getattr(c, "attention_chunk_size", None)
        types = getattr(c, "layer_types", None)
        impl = getattr(c, "_attn_implementation", None) or "sdpa"
        if types is None:  # as create_masks_for_generate: every layer slides, or is chunked, or is full
            kind = SLIDING if window is not None else CHUNKED if chunk is not None else FULL
            layout = MaskLayout((kind,), False, window, chunk, impl)
        else:
            layout = MaskLayout(tuple(sorted(set(types))), True, window, chunk, impl)
        layout.check(type(model).__name__)
        return layout

    def check(self, model_name: str) -> None:
        if self.attn_implementation not in ("sdpa", "eager"):
            raise CaptureError(f"{model_name} uses attn_implementation={self.attn_implementation!r}; zqcompile's KV "
                               f"cache passes prepared masks, which only 'sdpa' and 'eager' take: load the model "
                               f"with attn_implementation='sdpa'")
        unknown = [k for k in self.kinds if k not in (FULL, SLIDING, CHUNKED)]
        if unknown:
            raise CaptureError(f"{model_name} has attention layers of type {unknown}: zqcompile's KV cache builds "
                               f"masks for {FULL!r}, {SLIDING!r} and {CHUNKED!r} layers only, so it cannot generate "
                               f"with this model (engine(...) on full sequences still works)")
        for kind, size, name in ((SLIDING, self.sliding_window, "sliding_window"),
                                 (CHUNKED, self.chunk_size, "attention_chunk_size")):
            if kind in self.kinds and not (isinstance(size, int) and size > 0):
                raise CaptureError(f"{model_name} has {kind!r} layers but config.{name} is {size!r}; set it to "
                                   f"the window in tokens")

    def masks(self, kv_mask: torch.Tensor, cache_position: torch.Tensor,
              dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
        """kv_mask [batch, max_cache_len] (1 = a filled, real slot), cache_position [query] (the queries'
        slots), dtype (the model's, for an eager model's additive mask) -> the mask, or {layer type: mask}."""
        out = {kind: self._mask(kind, kv_mask, cache_position) for kind in self.kinds}
        if self.attn_implementation == "eager":
            zero = torch.zeros((), dtype=dtype, device=kv_mask.device)
            out = {k: torch.where(m, zero, torch.finfo(dtype).min) for k, m in out.items()}
        return out if self.per_layer_type else out[self.kinds[0]]

    def _mask(self, kind: str, kv_mask: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        kv = torch.arange(kv_mask.shape[-1], device=kv_mask.device)[None, :]
        q = cache_position[:, None]
        allowed = (kv <= q)[None] & kv_mask.bool()[:, None, :]
        if kind == SLIDING:
            allowed = allowed & (kv > q - self.sliding_window)[None]
        elif kind == CHUNKED:
            left_pad = (kv_mask.cumsum(-1) == 0).sum(-1)[:, None, None]
            allowed = allowed & ((kv[None] - left_pad) // self.chunk_size == (q[None] - left_pad) // self.chunk_size)
        # each token always sees itself: a left pad's row is then never fully masked (no NaN from softmax)
        return (allowed | (kv == q)[None])[:, None]
