"""Generation engine on small random-init causal LMs (fp32, CPU reference ops): greedy equals Hugging Face
generate, left padding, seeded sampling, one copy of shared weights and cache, INT8 KV cache, bad input."""
import pytest
import torch

import zqcompile as zq
from zqcompile.capture import InputError
from zqcompile.generation.kv_cache import CacheSpec
from zqcompile.models import tiny_model

from .conftest import ids as make_ids

NEW = 50


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    engine = zq.compile(model, (make_ids(1, 8),), config="none", generation=CacheSpec(4, 96))
    return model, engine


def _hf_greedy(model, ids, mask=None, new=NEW):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)


def test_greedy_equals_hf_generate_50_tokens(llama):
    model, engine = llama
    ids = make_ids(1, 12, seed=3)
    out = engine.generate(ids, max_new_tokens=NEW)
    assert out.shape == (1, 12 + NEW)
    assert torch.equal(out, _hf_greedy(model, ids))


def test_left_padded_batch_equals_hf_and_unpadded_rows(llama):
    model, engine = llama
    ids = make_ids(3, 10, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ids = ids.masked_fill(mask == 0, 0)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=20)
    assert torch.equal(out, _hf_greedy(model, ids, mask, 20))
    alone = engine.generate(ids[1:2, 4:], max_new_tokens=20)
    assert torch.equal(alone[0, 6:], out[1, 10:])


def test_sampling_is_seeded_and_reproducible(llama):
    _, engine = llama
    ids = make_ids(2, 6, seed=5)
    kw = dict(max_new_tokens=15, do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
    a = engine.generate(ids, seed=7, **kw)
    b = engine.generate(ids, seed=7, **kw)
    c = engine.generate(ids, seed=8, **kw)
    greedy = engine.generate(ids, max_new_tokens=15)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, greedy)


def test_eos_stops_and_pads(llama):
    _, engine = llama
    ids = make_ids(1, 8, seed=3)
    first = int(engine.generate(ids, max_new_tokens=1)[0, -1])
    out = engine.generate(ids, max_new_tokens=10, eos_token_id=first)
    assert out.shape == (1, 9) and int(out[0, -1]) == first


def test_prefill_decode_and_engine_share_one_copy_of_weights_and_cache(llama):
    _, engine = llama
    gen = engine._generator
    pre, dec = dict(gen.prefill.named_buffers()), dict(gen.decode.named_buffers())
    pre.update(gen.prefill.named_parameters())
    dec.update(gen.decode.named_parameters())
    assert set(dec) == set(pre)
    assert all(dec[k].data_ptr() == pre[k].data_ptr() for k in dec)
    assert dec["k_cache_0"].data_ptr() == pre["k_cache_0"].data_ptr()
    full = dict(engine.gm.named_buffers()) | dict(engine.gm.named_parameters())
    common = [k for k in full if k in pre]
    assert len(common) >= 10, sorted(full)[:10]  # the layer weights, under the same names
    assert all(pre[k] is full[k] for k in common)  # the same tensor objects: quantized once, shared


@pytest.mark.parametrize("bad, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=200), "exceeds the engine's context"),
    (dict(attention_mask=torch.ones(1, 5, dtype=torch.long)), "attention_mask has shape"),
    (dict(input_ids=make_ids(5, 8)), "larger than the largest batch bucket"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
])
def test_bad_input_is_a_clear_error_and_engine_stays_usable(llama, bad, match):
    model, engine = llama
    kw = dict(input_ids=make_ids(1, 8, seed=3), max_new_tokens=5)
    kw.update(bad)
    with pytest.raises(InputError, match=match):
        engine.generate(**kw)
    ids = make_ids(1, 12, seed=3)
    assert torch.equal(engine.generate(ids, max_new_tokens=5), _hf_greedy(model, ids, new=5))


def test_w8a8_generation_close_to_fp32_and_int8_kv_cache():
    model = tiny_model("llama", hidden=128)
    ids = make_ids(2, 16, seed=9)
    with torch.no_grad():
        ref = model(ids).logits[:, -1]
    results = {}
    for cfg, kv in (("w8a8", "model"), ("none", "int8")):
        engine = zq.compile(model, (ids,), config=cfg, generation=CacheSpec(2, 32, kv))
        gen = engine.prepare_generation(max_batch=2, max_cache_len=32, kv_cache=kv)
        pos = torch.arange(16).expand(2, 16)
        kv_mask = torch.zeros(2, 32, dtype=torch.long)
        kv_mask[:, :16] = 1
        with torch.no_grad():
            logits = gen.prefill(ids, pos, torch.arange(16), kv_mask)[0][:, -1]
        results[(cfg, kv)] = (gen, float((logits - ref).norm() / ref.norm()))
    gen_fp, err_w8a8 = results[("w8a8", "model")]
    gen_i8, err_kv8 = results[("none", "int8")]
    assert err_w8a8 < 0.05, err_w8a8
    assert err_kv8 < 0.02, err_kv8
    assert gen_i8.decode.k_cache_0.dtype == torch.int8
    # generate() runs the cache the engine was compiled with (it asked for a 'model' cache and refused before)
    engine = zq.compile(model, (ids,), config="none", generation=CacheSpec(2, 32, "int8"))
    assert torch.equal(engine.generate(ids, max_new_tokens=6), _hf_greedy(model, ids, new=6))
    # int8 values + one fp32 scale per token per head (head_dim 32) vs fp32 values: 9/32 of the bytes
    assert gen_i8.record.cache_bytes / gen_fp.record.cache_bytes == pytest.approx((32 + 4) / (32 * 4))


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_other_causal_families_greedy_equal_hf(family):
    model = tiny_model(family)
    ids = make_ids(1, 10, seed=2)
    engine = zq.compile(model, (ids,), config="none", generation=CacheSpec(1, 64))
    out = engine.generate(ids, max_new_tokens=20)
    assert torch.equal(out, _hf_greedy(model, ids, new=20))


def test_cache_spec_buckets():
    assert CacheSpec(max_batch=8).buckets == (1, 2, 4, 8)
    assert CacheSpec(max_batch=6).buckets == (1, 2, 4, 6)
    assert CacheSpec(max_batch=1).buckets == (1,)


def test_encoder_engine_cannot_generate():
    engine = zq.compile(tiny_model("bert"), (make_ids(2, 8),), config="none")
    with pytest.raises(InputError, match="not compiled from a causal LM"):
        engine.generate(make_ids(1, 4))


def test_generate_command_is_registered():
    from zqcompile.cli.main import build_parser
    args = build_parser().parse_args(["generate", "smollm2", "--prompt", "Hi", "--max-new-tokens", "7", "--chat"])
    assert (args.model, args.prompt, args.max_new_tokens, args.chat, args.config) == ("smollm2", "Hi", 7, True, "w8a8")
    assert args.fn.__name__ == "cmd_generate"


def test_decode_graph_buckets_and_padding():
    from zqcompile.runtime.cuda_graphs import BatchBucketedGraphs, pad_rows
    runner = BatchBucketedGraphs(lambda *a: None, CacheSpec(max_batch=8).buckets, unbatched=(2,))
    assert [runner.bucket_for(b) for b in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError, match="larger than the largest decode bucket 8"):
        runner.bucket_for(9)
    padded = pad_rows(torch.ones(3, 4, dtype=torch.long), 4)
    assert padded.shape == (4, 4) and int(padded[3].sum()) == 0 and int(padded[:3].sum()) == 12


def test_cache_keyword_follows_the_model_signature():
    """transformers < 5.18 takes the Cache as `past_key_values`, later as `cache`; a model taking neither is
    a clear capture error (an unknown keyword would be swallowed and the graph would ignore our cache)."""
    from torch import nn

    from zqcompile.capture import CaptureError
    from zqcompile.generation.kv_cache import cache_kwarg

    class Old(nn.Module):
        def forward(self, input_ids, past_key_values=None, **kwargs):
            return input_ids

    class New(nn.Module):
        def forward(self, input_ids, cache=None, **kwargs):
            return input_ids

    class Neither(nn.Module):
        def forward(self, input_ids, **kwargs):
            return input_ids

    assert cache_kwarg(Old()) == "past_key_values" and cache_kwarg(New()) == "cache"
    with pytest.raises(CaptureError, match="neither `cache` nor `past_key_values`"):
        cache_kwarg(Neither())


def test_saved_engine_generates_after_load(tmp_path, llama):
    """The generation graphs travel in the engine file; the loaded engine generates the same tokens, with one
    copy of the weights and cache again."""
    model, _ = llama
    engine = zq.compile(model, (make_ids(1, 8),), config="w8a8", generation=CacheSpec(2, 40))
    ids = make_ids(2, 9, seed=5)
    want = engine.generate(ids, max_new_tokens=12)
    engine.save(tmp_path / "gen.zq")
    loaded = zq.load(tmp_path / "gen.zq")
    assert torch.equal(loaded.generate(ids, max_new_tokens=12), want)
    gen = loaded._generator
    assert gen.decode.k_cache_0.data_ptr() == gen.prefill.k_cache_0.data_ptr()
    assert loaded.memory_bytes() == engine.memory_bytes()  # one copy of everything, as compiled
    torch.testing.assert_close(loaded(ids), engine(ids))


def test_engine_saved_without_generation_graphs_cannot_generate(tmp_path, llama):
    model, _ = llama
    engine = zq.compile(model, (make_ids(1, 8),), config="none", generation=False)
    engine.save(tmp_path / "plain.zq")
    with pytest.raises(InputError, match="has no generation graphs.*generation=zq.CacheSpec"):
        zq.load(tmp_path / "plain.zq").generate(make_ids(1, 4), max_new_tokens=2)
