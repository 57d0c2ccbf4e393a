"""mixed_precision (HERO's mode switch to an accuracy budget): the fewest sensitive GEMMs are kept in FP16 so the
calibration data meets the budget (next-token KL for a causal LM, the least embedding cosine for an encoder), the
engine's own measurement agrees with the prediction, feature scales first keep fewer GEMMs, generation graphs take
the same plan, and bad requests fail before any work."""
from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import zqcompile as zq
from tests._tiny import tiny_bert
from zqcompile.config import SCHEME_NAMES

from .test_feature_scales import outlier_bert, outlier_llama


def _ppl(fn, data):
    nll = n = 0.0
    with torch.no_grad():
        for (ids,) in data:
            logits = fn(ids).logits.float()
            nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
            n += ids[:, 1:].numel()
    return math.exp(nll / n)


@pytest.fixture(scope="module")
def model_and_data():
    m = outlier_llama()
    with torch.no_grad():  # a few GEMMs far more sensitive than the rest
        m.model.layers[1].mlp.down_proj.weight[:, 5] *= 40.0
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 128, (2, 64), generator=g),) for _ in range(2)]
    return m, data


def _kl(fn, m, data):
    """Mean next-token KL(float || fn) per token, as the budget measures it."""
    vals = []
    with torch.no_grad():
        for (ids,) in data:
            ref, out = m(ids).logits.float().log_softmax(-1), fn(ids).logits.float().log_softmax(-1)
            vals.append((ref.exp() * (ref - out)).sum(-1).reshape(-1))
    return float(torch.cat(vals).mean())


def _note(e):
    return next(f for f in e.record.fusions if f["kind"] == "accuracy-budget")["note"]


def _budget(budget: float, feature_scales: bool) -> zq.QuantConfig:
    return replace(zq.get_config("w8a8"), accuracy_budget=zq.AccuracyBudget(budget, feature_scales=feature_scales))


@pytest.fixture(scope="module")
def without_feature_scales(model_and_data):
    """(budget: a quarter of what plain W8A8 costs, the engine compiled to it without feature scales)."""
    m, data = model_and_data
    budget = math.expm1(_kl(zq.compile(m, data[0], "w8a8", generation=False), m, data)) / 4
    return budget, zq.compile(m, data[0], _budget(budget, False), calibration_data=data, generation=zq.CacheSpec(2, 80))


def test_budget_keeps_few_gemms_and_the_engine_meets_it(model_and_data, without_feature_scales):
    m, data = model_and_data
    budget, e = without_feature_scales
    kept = [f for f in e.record.fusions if f["kind"] == "mode-switch"]
    note = _note(e)
    assert 1 <= len(kept) < 8, note  # 14 8-bit GEMMs before merging; a few kept
    measured = _kl(e, m, data)
    # the choice is made on the fake-quant graph; the engine's integer GEMMs round differently by ~1% of this
    # model's ~3e-6 KL (the 2% allowed between prediction and measurement below): seen 1.0100x on a fresh venv
    assert math.expm1(measured) <= budget * 1.02, (measured, budget, note)
    pred = float(re.search(r"predicted KL ([\d.e-]+)", note).group(1))
    # the fake-quant prediction is the engine's numerics; the KL of this random-init model is ~3e-6, where the
    # integer GEMMs' fp32 rounding is ~1% of it
    assert pred == pytest.approx(measured, rel=2e-2)
    assert float(re.search(r"measured through the engine KL ([\d.e-]+)", note).group(1)) == pytest.approx(measured, rel=1e-3)
    fp, q = _ppl(m, data), _ppl(e, data)
    assert f"calibration perplexity {fp:.3f} -> {q:.3f}" in note and "stay 8-bit" in note
    text = e.report()
    assert "mode-switch" in text and "accuracy budget" in text
    # the generation graphs run the same FP16 GEMMs: greedy decode's first token is the full forward's argmax
    prompt = data[0][0][:1, :32]
    out = e.generate(prompt, max_new_tokens=1)
    assert int(out[0, -1]) == int(e(prompt).logits[0, -1].argmax())


def test_feature_scales_first_keep_fewer_gemms(model_and_data, without_feature_scales):
    """The default budget starts from HERO's feature-wise scales (the config has none): the outlier channels move
    into the weights and fewer GEMMs need FP16 for the same budget."""
    m, data = model_and_data
    budget, without = without_feature_scales
    e = zq.compile(m, data[0], "w8a8", calibration_data=data, accuracy_budget=budget, generation=False)
    assert [f for f in e.record.fusions if f["kind"] == "feature-scales"]
    kept = [f for f in e.record.fusions if f["kind"] == "mode-switch"]
    assert len(kept) < len([f for f in without.record.fusions if f["kind"] == "mode-switch"]), _note(e)
    assert math.expm1(_kl(e, m, data)) <= budget * 1.01


def test_budget_already_met_keeps_nothing(model_and_data):
    m, data = model_and_data
    e = zq.compile(m, data[0], _budget(0.9, False), calibration_data=data, generation=False)
    assert not [f for f in e.record.fusions if f["kind"] == "mode-switch"]
    assert "kept 0 of" in _note(e) and "forwards" in _note(e)


def test_encoder_budget_holds_the_least_embedding_cosine():
    """An encoder's budget is 1 - the least cosine of a sentence's mean-pooled embedding (over its attention mask)
    to float's: the engine meets it on the calibration sentences, keeping a few GEMMs in FP16."""
    m = outlier_bert()  # INT4 weights: W8A8's error on a random-init BERT's pooled embeddings is ~1e-5
    with torch.no_grad():  # two GEMMs far more sensitive than the rest
        m.encoder.layer[1].intermediate.dense.weight[:, 5] *= 40
        m.encoder.layer[0].attention.self.value.weight[:, 9] *= 40
    w4a8 = replace(zq.get_config("w8a8"), default=SCHEME_NAMES["w4a8"])
    g = torch.Generator().manual_seed(2)
    ids, mask = torch.randint(0, 128, (4, 12), generator=g), torch.ones(4, 12, dtype=torch.long)
    mask[2:, 4:] = 0  # short padded sentences

    def least_cosine(e):
        with torch.no_grad():
            ref, out = m(input_ids=ids, attention_mask=mask).last_hidden_state, e(ids, mask).last_hidden_state
        pool = lambda h: (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # noqa: E731
        return float(F.cosine_similarity(pool(out), pool(ref), dim=-1).min())

    plain = 1 - least_cosine(zq.compile(m, (ids, mask), w4a8))
    budget = replace(w4a8, accuracy_budget=zq.AccuracyBudget(plain / 3, feature_scales=False))
    e = zq.compile(m, (ids, mask), budget, calibration_data=[(ids, mask)])
    note = _note(e)
    assert 1 <= len([f for f in e.record.fusions if f["kind"] == "mode-switch"]) < 8, note
    cos = least_cosine(e)
    assert 1 - cos <= plain / 3 * 1.01, (cos, plain, note)
    assert float(re.search(r"measured through the engine min cosine ([\d.]+)", note).group(1)) == pytest.approx(cos, abs=2e-6)


def test_bad_budget_requests_fail_first(model_and_data):
    m, data = model_and_data
    with pytest.raises(zq.InputError, match="needs calibration_data"):
        zq.compile(m, data[0], "w8a8", accuracy_budget=0.01)
    with pytest.raises(zq.ConfigError, match="fraction in"):
        zq.compile(m, data[0], "w8a8", calibration_data=data, accuracy_budget=1.5)
    bert = tiny_bert()
    x = torch.randint(0, 100, (1, 8))
    with pytest.raises(zq.InputError, match="needs a causal LM"):
        zq.compile(bert, (x,), replace(zq.get_config("w8a8"), accuracy_budget=zq.AccuracyBudget(metric="kl")),
                   calibration_data=[(x,)])
    with pytest.raises(zq.ConfigError, match="metric must be"):
        zq.AccuracyBudget(metric="ppl")
