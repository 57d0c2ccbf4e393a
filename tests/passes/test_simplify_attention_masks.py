"""simplify_attention_masks against Hugging Face eager: sliding-window and chunked masks are kept (and the
model matches HF past the window), plain causal / all-visible masks are still simplified, and static batch
or sequence dims are probed at the example's size."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zqcompile as zq
from zqcompile.config import get_config
from zqcompile.models import tiny_model
from zqcompile.passes import PassContext
from zqcompile.passes.base import aten
from zqcompile.passes.simplify_attention_masks import MAX_PROBE_SEQ, probe_shapes, simplify_attention_masks

from .._tiny import tiny_windowed
from ..conftest import ids as make_ids, main_output, rel_err
from .helpers import captured


def _mask_record(engine) -> dict:
    return next(p for p in engine.record.passes if p["name"] == "simplify_attention_masks")


def _sdpa_is_causal(engine) -> list:
    """Per attention call: True / False once simplified, None while it still takes a mask tensor."""
    nodes = [n for n in engine.gm.graph.nodes if n.target == aten.scaled_dot_product_attention.default]
    return [n.kwargs["is_causal"] if len(n.args) == 3 else None for n in nodes]


def test_probe_shapes_cross_every_reachable_constant():
    ex = torch.zeros(2, 8, dtype=torch.long)
    ctx = PassContext(get_config("none"), (ex,), max_seq=128)
    assert probe_shapes(ctx, ex, [0, 1, 3]) == [(2, 5), (3, 9)]  # small constants: the small probes cross them
    assert probe_shapes(ctx, ex, [1, 16]) == [(2, 5), (3, 9), (1, 18)]  # a window of 16: both sides of it
    assert probe_shapes(ctx, ex, [16, 128, 2**63 - 1]) == [(2, 5), (3, 9), (1, 18)]  # >= max_seq: never reached
    assert probe_shapes(ctx, ex, [127]) == [(2, 5), (3, 9), (1, 128)]  # capped at max_seq: every length seen
    far = PassContext(get_config("none"), (ex,), max_seq=10**6)
    assert probe_shapes(far, ex, [MAX_PROBE_SEQ - 2])[-1] == (1, MAX_PROBE_SEQ)
    assert probe_shapes(far, ex, [MAX_PROBE_SEQ]) is None  # too long to probe: keep the mask
    assert probe_shapes(PassContext(get_config("none"), (ex,)), ex, [2**63 - 1]) is None  # max_seq unknown
    static_seq = PassContext(replace(get_config("none"), dynamic_seq=False), (ex,), max_seq=128)
    assert probe_shapes(static_seq, ex, [16]) == [(2, 8), (3, 8)]
    static_batch = PassContext(replace(get_config("none"), dynamic_batch=False), (ex,), max_seq=128)
    assert probe_shapes(static_batch, ex, [16]) == [(2, 5), (2, 9), (2, 18)]
    big = torch.zeros(8, 8, dtype=torch.long)  # a static batch of 8 probes 8 rows: 1/8 of the length
    static_big = PassContext(replace(get_config("none"), dynamic_batch=False), (big,), max_seq=10**6)
    assert probe_shapes(static_big, big, [MAX_PROBE_SEQ // 4])[-1] == (8, MAX_PROBE_SEQ // 4 + 2)
    assert probe_shapes(static_big, big, [MAX_PROBE_SEQ // 2]) is None


@pytest.mark.parametrize("family, preset, causal", [
    ("mistral", "none", [None, None]),  # every layer slides
    ("qwen2", "w8a8", [None, True]),  # layer 0 slides, layer 1 is full causal
    ("gemma3", "none", [None, True]),
])
def test_windowed_masks_kept_full_masks_simplified_and_hf_numerics_past_the_window(family, preset, causal):
    model = tiny_windowed(family, window=16)
    x = make_ids(2, 40, seed=1, vocab=128)
    engine = zq.compile(model, (x[:, :8].clone(),), preset)
    record = _mask_record(engine)
    assert _sdpa_is_causal(engine) == causal
    assert record["rewritten"] == sum(c is not None for c in causal)
    assert "not all-visible or causal at (batch 1, seq 18)" in record["notes"][-1]
    # probes at (2, 5) and (3, 9) saw a causal mask; past 16 tokens the window shows. The causal rewrite
    # measured 0.29 (mistral), 0.13 (qwen2), 0.54 (gemma3) at 40 tokens; w8a8 itself is ~0.01
    bound = 1e-5 if preset == "none" else 0.03
    with torch.no_grad():
        for seq in (20, 40):
            err = rel_err(engine(x[:, :seq]).logits, model(x[:, :seq]).logits)
            assert err < bound, (seq, err)


class ShapeMaskAttention(nn.Module):
    """Self-attention whose boolean mask is built from the sequence length only, as transformers builds it:
    causal, optionally within a sliding window or a chunk of positions."""

    def __init__(self, window: int | None = None, chunk: int | None = None):
        super().__init__()
        self.proj = nn.Linear(16, 48)
        self.window, self.chunk = window, chunk

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.proj(x).view(b, s, 3, 2, 8).permute(2, 0, 3, 1, 4)
        i = torch.arange(s, device=x.device)
        mask = i[None, :] <= i[:, None]
        if self.window:
            mask = mask & (i[None, :] > i[:, None] - self.window)
        if self.chunk:
            mask = mask & (i[None, :] // self.chunk == i[:, None] // self.chunk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None].expand(b, 1, s, s))


@pytest.mark.parametrize("window, chunk, max_seq, rewritten, note", [
    (None, None, 4096, 1, None),
    (16, None, 4096, 0, "not all-visible or causal at (batch 1, seq 18)"),
    (None, 16, 4096, 0, "not all-visible or causal at (batch 1, seq 18)"),
    (16, None, 16, 1, None),  # an engine of at most 16 tokens never leaves the window: causal for it
    (MAX_PROBE_SEQ + 100, None, 10**5, 0, f"a constant needs a probe longer than {MAX_PROBE_SEQ}"),
])
def test_hand_built_window_and_chunk_masks(window, chunk, max_seq, rewritten, note):
    module = ShapeMaskAttention(window, chunk).eval()
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
    gm = captured(module, x)
    res = simplify_attention_masks(gm, PassContext(get_config("none"), (x,), max_seq=max_seq))
    gm.recompile()
    assert res.rewritten == rewritten and (note is None or note in res.notes[-1]), res.notes
    seq = min(max_seq, 40)
    x = torch.randn(3, seq, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(gm(x), module(x)) < 1e-6


@pytest.mark.parametrize("family, dynamic_batch, dynamic_seq, preset", [
    ("gpt2", True, False, "none"),
    ("gpt2", False, True, "w8a8"),
    ("gpt2", False, False, "none"),
    ("llama", True, False, "w8a8"),
    ("llama", False, True, "none"),
    ("llama", False, False, "none"),
    ("bert", True, False, "none"),
    ("bert", False, True, "none"),
    ("bert", False, False, "w8a8"),
])
def test_static_dims_probe_at_the_example_size_and_masks_still_simplified(family, dynamic_batch, dynamic_seq, preset):
    model = tiny_model(family)
    x = make_ids(2, 12, seed=2)
    cfg = replace(get_config(preset), dynamic_batch=dynamic_batch, dynamic_seq=dynamic_seq)
    engine = zq.compile(model, (x,), cfg)
    kind = "none" if family == "bert" else "causal"
    assert _mask_record(engine)["notes"] == [f"2 shape-only masks -> {kind}"]
    assert _sdpa_is_causal(engine) == [kind == "causal"] * 2
    other = make_ids(3 if dynamic_batch else 2, 17 if dynamic_seq else 12, seed=3)  # a new size on dynamic dims
    bound = 1e-5 if preset == "none" else 0.03
    with torch.no_grad():
        for inp in (x, other):
            err = rel_err(main_output(engine(inp)), main_output(model(inp)))
            assert err < bound, (inp.shape, err)
