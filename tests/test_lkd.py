import copy
from dataclasses import replace

import pytest
import torch

import zqcompile as zq
from zqcompile.config import LKD_TUNING, ConfigError, LKDConfig
from zqcompile.accuracy.fakequant import fake_quantize
from zqcompile.accuracy.lkd import (capture_block_inputs, find_blocks, lkd_batches, resolved_data, run_lkd,
                                   run_lkd_with_stats)

from ._tiny import tiny_bert, tiny_gpt2, tiny_llama, tiny_opt

LKD = LKDConfig(data="random", steps=30, lr=1e-4, batch_size=2, seq_len=16, num_batches=2, seed=0, progress=False)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_lkd_strictly_lowers_block_mse(make):
    model = make()
    emb_before = model.get_input_embeddings().weight.clone()
    _, stats = run_lkd_with_stats(model, "w4/8a8", LKD)
    assert len(stats) == 2
    for s in stats:
        assert s.loss_after < s.loss_before, s
    # only block weights change
    assert torch.equal(model.get_input_embeddings().weight, emb_before)


def _logit_error(model, engine, ids) -> float:
    with torch.no_grad():
        ref = model(ids).logits
        return float((engine(ids).logits - ref).norm() / ref.norm())


@pytest.mark.parametrize("make", [tiny_opt, tiny_gpt2], ids=["opt", "gpt2"])
def test_lkd_defaults_lower_the_w4_8a8_engines_logit_error(make):
    """LKD with the text / sampled-data settings (weights, learned clipping, cosine lr, student fed by the tuned
    quantized blocks) on random ids lowers the compiled W4/8A8 engine's logit error on held-out tokens by >= 25%;
    measured: OPT -38%, GPT-2 -62% here (40 steps of 2 x 32 tokens), -46% / -71% with the default 100 steps of
    4 x 128; random ids' own settings (weights only, lr 1e-4 constant, fp inputs, 100 steps) gave -5% / -29%."""
    model = make()
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(123))  # not LKD's data
    before = _logit_error(model, zq.compile(copy.deepcopy(model), (ids,), "w4/8a8", generation=False), ids)
    settings = {**LKD_TUNING["default"], "num_batches": 4}
    tuned = run_lkd(copy.deepcopy(model), "w4/8a8", LKDConfig(data="random", steps=40, batch_size=2, seq_len=32,
                                                                   progress=False, **settings))
    after = _logit_error(model, zq.compile(tuned, (ids,), "w4/8a8", generation=False), ids)
    assert after < 0.75 * before, (before, after)


def test_lkd_tuned_weights_lower_quantized_block_error_measured_independently():
    """Re-measure block 0's quantized-vs-fp MSE outside of LKD, before and after."""
    model = tiny_llama()
    ref = copy.deepcopy(model)
    prefix, blocks = find_blocks(model)
    batches = lkd_batches(model, LKD)
    args, kw = capture_block_inputs(model, blocks[0], batches[0])

    def err(m):
        block = fake_quantize(copy.deepcopy(find_blocks(m)[1][0]), "w4/8a8", prefix=f"{prefix}.0")
        with torch.no_grad():
            out = block(*args, **kw)
            target = find_blocks(ref)[1][0](*args, **kw)
        return float(torch.nn.functional.mse_loss(out, target))

    before = err(model)
    run_lkd(model, "w4/8a8", LKD)
    assert err(model) < before


def test_lkd_deterministic_with_seed():
    a, b = tiny_gpt2(), tiny_gpt2()
    run_lkd(a, "w4/8a8", LKD)
    run_lkd(b, "w4/8a8", LKD)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
    c = tiny_gpt2()
    run_lkd(c, "w4/8a8", LKDConfig(**{**LKD.__dict__, "seed": 1}))
    assert not torch.equal(c.transformer.h[0].mlp.c_fc.weight, a.transformer.h[0].mlp.c_fc.weight)


def test_lkd_random_data_and_token_batches():
    model = tiny_gpt2()
    batches = lkd_batches(model, LKD)
    assert len(batches) == 2 and batches[0].shape == (2, 16)
    assert int(batches[0].max()) < 128 and batches[0].dtype == torch.long
    given = [torch.arange(16).view(1, 16) % 128]
    _, stats = run_lkd_with_stats(model, "w8a8", LKDConfig(data=given, steps=5, progress=False))
    assert len(stats) == 2 and all(s.loss_before > 0 for s in stats)


def test_lkd_encoder():
    _, stats = run_lkd_with_stats(tiny_bert(), "w4/8a8", LKD)
    assert [s.fqn for s in stats] == ["encoder.layer.0", "encoder.layer.1"]
    assert all(s.kept and s.loss_after < s.loss_before for s in stats)


def test_lkd_static_activations_never_worse():
    """ptq-static (calibrated per-tensor activations); a too-large lr must leave the blocks unchanged."""
    model = tiny_bert()
    before = copy.deepcopy(model.state_dict())
    bad = LKDConfig(**{**LKD.__dict__, "lr": 1e-2})
    _, stats = run_lkd_with_stats(model, "ptq-static", bad)
    assert all(s.loss_after <= s.loss_before for s in stats)
    for s in stats:
        if not s.kept:
            k = s.fqn + "."
            assert all(torch.equal(v, before[n]) for n, v in model.state_dict().items() if n.startswith(k))
    assert not all(s.kept for s in stats)


def test_lkd_text_needs_tokenizer():
    with pytest.raises(ConfigError, match="tokenizer"):
        lkd_batches(tiny_gpt2(), LKDConfig(data="some text"))


def test_find_blocks_known_paths():
    assert find_blocks(tiny_gpt2())[0] == "transformer.h"
    assert find_blocks(tiny_llama())[0] == "model.layers"
    assert find_blocks(tiny_bert())[0] == "encoder.layer"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lkd_on_gpu_matches_cpu():
    """Each block's loss before tuning is the same on both devices when its inputs are the fp model's (with the
    default quantized inputs, block i > 0 sees blocks tuned on each device, which drift apart: the H200 run of the
    older form failed on a GPU loss of 4.76..., beside the CPU's 4.88e-7 for block 1; this form has not run on a
    GPU yet); LKD lowers every block's loss on the GPU with the defaults too."""
    from dataclasses import replace
    fp_inputs = replace(LKD, student_input="fp")
    _, s_cpu = run_lkd_with_stats(tiny_llama(), "w4/8a8", fp_inputs)
    _, s_gpu = run_lkd_with_stats(tiny_llama().cuda(), "w4/8a8", fp_inputs)
    for a, b in zip(s_cpu, s_gpu):
        assert b.loss_before == pytest.approx(a.loss_before, rel=1e-2)
    gpu = tiny_llama().cuda()
    _, s_gpu = run_lkd_with_stats(gpu, "w4/8a8", LKD)
    assert all(s.loss_after < s.loss_before for s in s_gpu)
    assert next(gpu.parameters()).is_cuda


def test_lkd_warns_that_feature_scales_are_not_distilled():
    from dataclasses import replace

    from zqcompile.config import ConfigWarning, FeatureScales, get_config
    cfg = replace(get_config("w4/8a8"), feature_scales=FeatureScales(alpha=0.5))
    with pytest.warns(ConfigWarning, match="without its feature-wise scales"):
        _, stats = run_lkd_with_stats(tiny_gpt2(), cfg, LKDConfig(steps=1, batch_size=1, seq_len=8, num_batches=1,
                                                                  progress=False))
    assert len(stats) == 2 and all(s.loss_before > 0 for s in stats)


def test_lkd_generated_data_is_sampled_from_the_model():
    """data='generated': batches of seq_len tokens sampled from the fp model, deterministic with the seed; its
    first token is uniform random, the rest follow the model (a random-init model's favourite tokens repeat)."""
    cfg = LKDConfig(data="generated", batch_size=2, seq_len=16, num_batches=2, progress=False)
    model = tiny_llama()
    torch.manual_seed(0)
    a = lkd_batches(model, cfg)
    torch.manual_seed(0)
    b = lkd_batches(model, cfg)
    assert [t.shape for t in a] == [(2, 16), (2, 16)] and all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(int(t.min()) >= 0 and int(t.max()) < 128 for t in a)
    with torch.no_grad():  # each sampled token is one the model gives a real probability after its prefix
        logp = torch.log_softmax(model(a[0]).logits[:, :-1], -1).gather(-1, a[0][:, 1:, None])
    assert float(logp.mean()) > float(torch.log(torch.tensor(1 / 128))) - 1
    with pytest.raises(ConfigError, match="causal LM"):
        lkd_batches(tiny_bert(), cfg)


def _outside_top_p(model, batch: torch.Tensor, temperature: float, top_p: float) -> int:
    """How many sampled tokens lie outside the smallest set of the tempered next-token distribution holding top_p."""
    with torch.no_grad():
        probs = torch.softmax(model(batch).logits[:, :-1] / temperature, -1)
    p_tok = probs.gather(-1, batch[:, 1:, None])
    mass_above = (probs * (probs > p_tok)).sum(-1, keepdim=True)  # of the tokens more likely than the sampled one
    return int((mass_above > top_p + 1e-5).sum())


def test_lkd_generated_data_samples_at_the_configured_temperature_and_top_p():
    """data='generated' samples within the top-p set of the tempered distribution; temperature 1, top_p 1 (plain
    sampling) goes outside it."""
    model = tiny_llama()
    cfg = LKDConfig(data="generated", batch_size=2, seq_len=16, num_batches=1, temperature=0.5, top_p=0.3,
                    progress=False)
    torch.manual_seed(0)
    assert _outside_top_p(model, lkd_batches(model, cfg)[0], 0.5, 0.3) == 0
    torch.manual_seed(0)
    assert _outside_top_p(model, lkd_batches(model, replace(cfg, temperature=1.0, top_p=1.0))[0], 0.5, 0.3) > 0
    for bad in (dict(temperature=0), dict(top_p=1.5), dict(top_p=0)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            LKDConfig(**bad)


def test_lkd_tuning_defaults_depend_on_the_data():
    """Fields left at None take the data's tuning: random ids the conservative one (on SmolLM2 the text settings
    made it 40.97 vs 29.58 untuned), sampled data 32 batches, everything else the issue-14 one; a field given stays
    as given."""
    assert LKDConfig(data="random").resolved_for("random") == LKDConfig(
        data="random", lr=1e-4, clip_lr=0.0, schedule="constant", student_input="fp", num_batches=8)
    assert LKDConfig(lr=1e-3).resolved_for("some text") == LKDConfig(
        lr=1e-3, clip_lr=5e-3, schedule="cosine", student_input="quantized", num_batches=8)
    assert LKDConfig(num_batches=3).resolved_for("generated").num_batches == 3
    assert len(lkd_batches(tiny_gpt2(), LKDConfig(batch_size=1, seq_len=4))) == 32  # auto -> generated: 32 batches
    assert resolved_data(tiny_gpt2(), LKDConfig()) == "generated"
    assert resolved_data(tiny_bert(), LKDConfig()) == "random"


def test_default_lkd_data_samples_a_causal_lm_and_uses_random_ids_elsewhere():
    """data='auto' (the default): uniform random ids made the real SmolLM2 worse (40.97 vs 29.58 untuned, engine
    path), sampled text recovers 36% of the gap: a causal LM gets sampled text, an encoder random ids."""
    cfg = LKDConfig(batch_size=2, seq_len=8, num_batches=1, progress=False)
    assert cfg.data == "auto"
    model = tiny_gpt2()
    torch.manual_seed(5)  # generate() samples with the global generator
    got = lkd_batches(model, cfg)
    torch.manual_seed(5)
    want = lkd_batches(model, LKDConfig(**{**cfg.__dict__, "data": "generated"}))
    assert torch.equal(got[0], want[0])
    bert = tiny_bert()
    assert torch.equal(lkd_batches(bert, cfg)[0], lkd_batches(bert, LKDConfig(**{**cfg.__dict__, "data": "random"}))[0])
