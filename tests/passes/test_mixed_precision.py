"""mixed_precision (HERO's mode switch to an accuracy budget): the fewest sensitive GEMMs are kept in FP16 so the
calibration perplexity meets the budget, the engine's own perplexity agrees with the prediction, generation
graphs take the same plan, and bad requests fail before any work."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import zqcompile as zq
from tests._tiny import tiny_bert

from .test_feature_scales import outlier_llama


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


def test_budget_keeps_few_gemms_and_the_engine_meets_it(model_and_data):
    m, data = model_and_data
    fp, plain = _ppl(m, data), _ppl(zq.compile(m, data[0], "w8a8", generation=False), data)
    budget = (plain / fp - 1) / 4  # a quarter of what plain W8A8 costs
    e = zq.compile(m, data[0], "w8a8", calibration_data=data, accuracy_budget=budget, generation=zq.CacheSpec(2, 80))
    kept = [f for f in e.record.fusions if f["kind"] == "mode-switch"]
    summary = next(f for f in e.record.fusions if f["kind"] == "accuracy-budget")
    assert 1 <= len(kept) < 8, summary["note"]  # 14 8-bit GEMMs before merging; a few kept
    measured = _ppl(e, data)
    assert measured <= fp * (1 + budget) * 1.002, (measured, fp, budget, summary["note"])
    pred = float(re.search(r"predicted ([\d.]+)", summary["note"]).group(1))
    assert pred == pytest.approx(measured, rel=2e-3)  # the fake-quant prediction is the engine's numerics
    assert f"measured through the engine {measured:.3f}" in summary["note"] and "stay 8-bit" in summary["note"]
    text = e.report()
    assert "mode-switch" in text and "accuracy budget" in text
    # the generation graphs run the same FP16 GEMMs: greedy decode's first token is the full forward's argmax
    prompt = data[0][0][:1, :32]
    out = e.generate(prompt, max_new_tokens=1)
    assert int(out[0, -1]) == int(e(prompt).logits[0, -1].argmax())


def test_budget_already_met_keeps_nothing(model_and_data):
    m, data = model_and_data
    e = zq.compile(m, data[0], "w8a8", calibration_data=data, accuracy_budget=0.9, generation=False)
    assert not [f for f in e.record.fusions if f["kind"] == "mode-switch"]
    assert "kept 0 of" in next(f for f in e.record.fusions if f["kind"] == "accuracy-budget")["note"]


def test_bad_budget_requests_fail_first(model_and_data):
    m, data = model_and_data
    with pytest.raises(zq.InputError, match="needs calibration_data"):
        zq.compile(m, data[0], "w8a8", accuracy_budget=0.01)
    with pytest.raises(zq.ConfigError, match="fraction in"):
        zq.compile(m, data[0], "w8a8", calibration_data=data, accuracy_budget=1.5)
    bert = tiny_bert()
    x = torch.randint(0, 100, (1, 8))
    with pytest.raises(zq.InputError, match="causal LM"):
        zq.compile(bert, (x,), "w8a8", calibration_data=[(x,)], accuracy_budget=0.01)
