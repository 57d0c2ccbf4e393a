"""Generation with sliding-window / chunked attention (fp32, CPU): the cache masks equal transformers' mask
functions, and greedy generation past the window equals Hugging Face generate, left-padded rows included."""
from types import SimpleNamespace

import pytest
import torch
from transformers import masking_utils as hf

from zqcompile.generation.masks import CHUNKED, FULL, SLIDING, MaskLayout
from zqcompile.capture import CaptureError
from zqcompile.config import get_config
from zqcompile.generation.generator import build_generator
from zqcompile.generation.kv_cache import CacheSpec
from zqcompile.generation.sampling import SamplingParams

from ._tiny import tiny_windowed
from .conftest import rel_err

WINDOW = 8


def _hf_mask(kind: str, kv_mask: torch.Tensor, cache_position: torch.Tensor, size: int) -> torch.Tensor:
    """transformers' mask function for `kind` on the same slots, & padding, | the diagonal we add for pads."""
    left_pad = (kv_mask.cumsum(-1) == 0).sum(-1)
    fn = {FULL: hf.causal_mask_function, SLIDING: hf.sliding_window_causal_mask_function(size),
          CHUNKED: hf.chunked_causal_mask_function(size, left_pad)}[kind]
    fn = hf.and_masks(fn, hf.padding_mask_function(kv_mask.bool()))
    q, kv = cache_position[:, None], torch.arange(kv_mask.shape[-1])[None, :]
    rows = [fn(b, 0, q, kv) | (q == kv) for b in range(kv_mask.shape[0])]
    return torch.stack(rows)[:, None]


@pytest.mark.parametrize("kind", [FULL, SLIDING, CHUNKED])
def test_cache_masks_equal_transformers_mask_functions(kind):
    """Boolean for SDPA; for eager attention the additive form of the same mask (0 / the dtype's min)."""
    kv_mask = torch.zeros(3, 24, dtype=torch.long)
    kv_mask[0, :20] = 1
    kv_mask[1, 5:20] = 1  # left padded
    kv_mask[2, 11:20] = 1
    layout = MaskLayout((kind,), False, sliding_window=5, chunk_size=5)
    for cache_position in (torch.arange(20), torch.tensor([19])):  # prefill, then one decode step
        got = layout.masks(kv_mask, cache_position, torch.float32)
        assert got.shape == (3, 1, cache_position.numel(), 24)
        want = _hf_mask(kind, kv_mask, cache_position, 5)
        assert torch.equal(got, want)
        eager = MaskLayout((kind,), False, 5, 5, "eager").masks(kv_mask, cache_position, torch.bfloat16)
        assert eager.dtype == torch.bfloat16
        assert torch.equal(eager, torch.where(want, 0.0, torch.finfo(torch.bfloat16).min).to(torch.bfloat16))


def test_mask_layout_follows_the_config_as_transformers_generate_does():
    def of(**cfg):
        return MaskLayout.of(SimpleNamespace(config=SimpleNamespace(**cfg)))

    assert of() == MaskLayout((FULL,), False)
    assert of(sliding_window=16) == MaskLayout((SLIDING,), False, 16)  # Mistral: one mask, every layer slides
    assert of(sliding_window=16, layer_types=[SLIDING, FULL, SLIDING]) == MaskLayout((FULL, SLIDING), True, 16)
    with pytest.raises(CaptureError, match="'linear_attention'.*cannot generate"):
        of(layer_types=["linear_attention", FULL])
    with pytest.raises(CaptureError, match="config.attention_chunk_size is None"):
        of(layer_types=[CHUNKED])
    assert of(_attn_implementation="eager").attn_implementation == "eager"
    with pytest.raises(CaptureError, match="attn_implementation='flash_attention_2'.*load the model with"):
        of(_attn_implementation="flash_attention_2")


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma2"])
def test_greedy_past_the_window_equals_hf_generate(family):
    """window 8, prompts of 10 (two rows left-padded), 30 new tokens; EOS off so that HF generates all 30.
    Mistral takes one mask for all layers, Qwen2 and Gemma2 {layer type: mask}; Gemma2's eager attention
    adds its mask to the scores (a boolean mask would add 0 / 1 and mask nothing). The generation graphs are
    built directly (as in test_generation_real) to skip the full-sequence graph."""
    model = tiny_windowed(family, window=WINDOW, eos_token_id=None)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 128, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    ids = ids.masked_fill(mask == 0, 0)
    gen = build_generator(model, get_config("none"), CacheSpec(max_batch=4, max_cache_len=64))
    out = gen.generate(ids, mask, 30, SamplingParams(), None, None, None)
    assert torch.equal(out, model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False))
    # a 20-token prompt's prefill logits: the causal-only boolean mask gave 0.57 (mistral), 0.34 (qwen2), 1.2 (gemma2)
    prompt = torch.randint(0, 128, (2, 20), generator=g)
    kv_mask = torch.zeros(2, 64, dtype=torch.long)
    kv_mask[:, :20] = 1
    with torch.no_grad():
        logits = gen.prefill(prompt, torch.arange(20).expand(2, 20), torch.arange(20), kv_mask)[0][:, -1]
        assert rel_err(logits, model(prompt).logits[:, -1]) < 1e-5
