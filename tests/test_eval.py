import math

import pytest
import torch

from zqcompile.accuracy.eval import encoder_agreement, output_tensor, perplexity, windows

from ._tiny import tiny_gpt2

V = 5


class Bigram(torch.nn.Module):
    """logits[t] = table[ids[t]]: next-token distribution depends only on the current token."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(V, V, generator=g)

    def forward(self, ids):
        return self.table[ids]


def hand_ppl(table, ids, window, stride):
    """Straight from the definition, with python floats."""
    nll, n, scored = 0.0, 0, set()
    begin = 0
    while True:
        end = min(begin + window, len(ids))
        for t in range(begin + 1, end):
            if t in scored:
                continue
            row = [float(v) for v in table[ids[t - 1]]]
            lse = math.log(sum(math.exp(v) for v in row))
            nll += lse - row[ids[t]]
            n += 1
            scored.add(t)
        if end == len(ids):
            break
        begin += stride
    return math.exp(nll / n), n


@pytest.mark.parametrize("window,stride", [(4, 4), (4, 2), (5, 1), (20, 20), (3, 3)])
def test_perplexity_matches_hand_computation(window, stride):
    m = Bigram()
    ids = [0, 3, 1, 4, 4, 2, 0, 1, 3, 2, 2]
    expect, n = hand_ppl(m.table, ids, window, stride)
    r = perplexity(m, torch.tensor(ids), window=window, stride=stride)
    assert r.num_tokens_scored == n
    assert r.ppl == pytest.approx(expect, rel=1e-5)


def test_non_overlapping_windows_skip_each_windows_first_token():
    spans = windows(10, 4, 4)
    assert spans == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert sum(e - f for _, e, f in spans) == 10 - 3
    assert windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    with pytest.raises(ValueError):
        windows(10, 4, 5)


def test_perplexity_of_hf_model_equals_its_own_loss():
    """One window covering the whole text: ppl = exp(HF's mean next-token loss)."""
    model = tiny_gpt2()
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    r = perplexity(model, ids, window=64)
    assert r.ppl == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert r.num_windows == 1 and r.num_tokens_scored == 29


def test_output_tensor_accepts_tensors_outputs_and_tuples():
    t = torch.zeros(1, 2, 3)
    assert output_tensor(t) is t
    assert output_tensor((t, None)) is t
    with pytest.raises(TypeError):
        output_tensor(object())


def test_encoder_agreement():
    torch.manual_seed(0)
    ref = torch.randn(2, 3, 8)
    noisy = ref + 0.1 * torch.randn(2, 3, 8)
    same = encoder_agreement(lambda ids: ref, lambda ids: ref, [torch.zeros(2, 3, dtype=torch.long)])
    assert same.cosine_mean == pytest.approx(1.0, abs=1e-6) and same.token_cosine_mean == pytest.approx(1.0, abs=1e-6)
    r = encoder_agreement(lambda ids: ref, lambda ids: noisy, [torch.zeros(2, 3, dtype=torch.long)])
    e_ref, e_noisy = ref.mean(1), noisy.mean(1)
    expect = torch.nn.functional.cosine_similarity(e_ref, e_noisy, dim=-1)
    assert r.cosine_mean == pytest.approx(float(expect.mean()), rel=1e-6)
    assert r.cosine_min == pytest.approx(float(expect.min()), rel=1e-6)
    assert r.token_cosine_mean < 1.0 and r.num_sequences == 2
