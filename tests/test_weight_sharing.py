"""One copy of every weight: the engine, prefill and decode graphs hold the same quantized tensors (made once
at compile), the float model is released after compile, an engine file stores each constant once, deleting
an engine frees what it held, and the report says what compiling took."""
from __future__ import annotations

import gc
import os
import weakref

import torch
import transformers as T

import zqcompile as zq
from zqcompile.generation.kv_cache import is_cache_buffer
from zqcompile.runtime.constants import tensor_bytes, unique_tensors

from .conftest import ids


def _llama(vocab: int = 8000, hidden: int = 256):
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return T.LlamaForCausalLM(cfg).eval()


def _quantized(gm) -> dict[str, torch.Tensor]:
    return {n: t for n, t in gm.named_buffers() if n.endswith(("_wq", "_w_scale"))}


def test_graphs_share_the_quantized_weights_and_the_float_model_is_released(tmp_path):
    model = _llama()
    x = ids(2, 8, vocab=8000)
    with torch.no_grad():
        want = model(x).logits
    alive = weakref.ref(model)
    gemm_weights = [weakref.ref(m.weight) for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    engine = zq.compile(model, (x,), "w8a8", generation=zq.CacheSpec(2, 32))
    del model
    gc.collect()
    assert alive() is None  # nothing of the engine keeps the float model
    # ... nor its quantized layers' float weights (a KV cache written with autograd on once held them all)
    assert sum(w() is not None for w in gemm_weights) == 0
    assert not any(t.grad_fn is not None for g in engine.graphs for t in [*g.parameters(), *g.buffers()])

    gen = engine._generator
    full = {id(t) for t in _quantized(engine.gm).values()}
    for graph in (gen.prefill, gen.decode):
        q = _quantized(graph)
        assert len(q) == len(full) == 2 * 7 * 2 - 2 * 3 * 2  # wq + scale per GEMM, q/k/v and gate/up merged
        assert {id(t) for t in q.values()} == full  # the same tensor objects: quantized once
    cache = tensor_bytes(t for n, t in gen.decode.named_buffers() if is_cache_buffer(n))
    extra = engine.memory_bytes() - cache - engine.weight_bytes()
    assert 0 <= extra < 0.01 * engine.weight_bytes(), extra  # beyond the engine graph's: only small constants
    assert (engine(x).logits - want).norm() / want.norm() < 0.05

    with_gen, plain = tmp_path / "gen.zq", tmp_path / "plain.zq"
    engine.save(with_gen)
    zq.compile(_llama(), (x,), "w8a8", generation=False).save(plain)
    ratio = os.path.getsize(with_gen) / os.path.getsize(plain)
    assert ratio <= 1.1, ratio  # the generation graphs add programs, not weights

    report = engine.report()
    assert "compile peak host memory" in report and "engine holds" in report
    assert engine.record.memory["host_peak_bytes"] > engine.record.memory["engine_bytes"] > 0


def test_moving_keeps_one_copy_and_deleting_frees_everything():
    engine = zq.compile(_llama(vocab=1000, hidden=64), (ids(2, 8),), "w8a8", generation=zq.CacheSpec(2, 16))
    before = engine.memory_bytes()
    engine.to("cpu")  # a move (here to the same device) re-binds every graph to one copy of each tensor
    assert engine.memory_bytes() == before
    gen = engine._generator
    assert {id(t) for t in _quantized(gen.decode).values()} == {id(t) for t in _quantized(engine.gm).values()}
    assert gen.decode.k_cache_0 is gen.prefill.k_cache_0
    held = [weakref.ref(t) for t in unique_tensors(engine.graphs)]
    assert len(held) > 20
    del engine, gen
    gc.collect()
    assert not [r for r in held if r() is not None]


def test_intermediate_constants_are_freed_when_replaced_and_remade_with_the_same_key():
    """SharedConstants holds what it made weakly and keys it by its recipe: a concatenated FP weight is freed
    once its quantized form replaced it (it was 9 GB of the 8B shape's compile peak), and a later graph that
    concatenates again finds the same quantized tensors."""
    from zqcompile.passes.constants import SharedConstants
    memo = SharedConstants()
    q, k = torch.randn(8, 4), torch.randn(8, 4)
    made = []

    def quantized():
        cat = memo.get(("cat", q, k), lambda: torch.cat([q, k]))
        gone = weakref.ref(cat)
        out = memo.get(("quantize", cat, 8), lambda: made.append(1) or (cat.round().to(torch.int8), cat.amax(1)))
        return out, gone

    (wq, ws), gone = quantized()
    gc.collect()
    assert gone() is None  # nothing holds the concatenation now
    (wq2, ws2), _ = quantized()
    assert wq2 is wq and ws2 is ws and made == [1] and memo.hits == 1
    del wq, ws, wq2, ws2
    gc.collect()
    quantized()
    assert made == [1, 1]  # every graph dropped the quantized pair: made again, never a stale tensor


def test_compile_leaves_the_users_model_as_it_was():
    """The engine shares the model's float parameters (embeddings, norms, head): compile must not change them
    (requires_grad included), and the model still trains."""
    model = _llama(vocab=1000, hidden=64)
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    zq.compile(model, (ids(2, 8, vocab=1000),), "w8a8", generation=zq.CacheSpec(2, 16))
    for n, p in model.named_parameters():
        assert p.requires_grad == before[n][0] and torch.equal(p, before[n][1]), n
    model(ids(1, 4, vocab=1000)).logits.sum().backward()
    assert model.lm_head.weight.grad is not None
