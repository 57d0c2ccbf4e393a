"""Inputs as users have them: a tokenizer's padded BatchEncoding (input_ids, attention_mask, token_type_ids) is
what zq.compile captures from and what the engine takes (as one dict or as keywords); every row of a padded
batch gives what that row alone gives, and both are close to the float model (HF fp32, eager PyTorch)."""
from __future__ import annotations

import pytest
import torch

import zqcompile as zq
from tests.conftest import main_output, rel_err

SENTENCES = ["the cat sat on the mat and looked at the door for a while",
             "a dog ran",
             "the bird sang in the tall tree by the river"]


def _tokenizer():
    """A real Hugging Face fast tokenizer (word level, BERT-style [CLS] a [SEP]), padding on the right."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", padding_side="right")


def _model(family: str):
    import transformers as T
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=64)
    if family == "bert":
        return T.BertModel(T.BertConfig(**common)).eval()
    return T.LlamaForCausalLM(T.LlamaConfig(**common, num_key_value_heads=2, pad_token_id=0)).eval()


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_padded_batch_from_a_tokenizer(family):
    tok = _tokenizer()
    kw = dict(return_tensors="pt", return_token_type_ids=family == "bert")
    batch = tok(SENTENCES, padding=True, **kw)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3 and min(lengths) < batch["input_ids"].shape[1]  # really padded
    model = _model(family)
    engine = zq.compile(model, batch, "w8a8", generation=False)  # the BatchEncoding itself
    assert sorted(engine.input_names) == sorted(batch.keys())
    out = main_output(engine(batch))
    assert torch.equal(out, main_output(engine(**batch)))
    with torch.no_grad():
        ref = main_output(model(**batch))
    for i, (sentence, n) in enumerate(zip(SENTENCES, lengths)):
        alone = tok([sentence], **kw)
        assert alone["input_ids"].shape[1] == n
        row = main_output(engine(alone))[0]
        assert (out[i, :n] - row).abs().max() <= 1e-4 * row.abs().max()  # padding changes nothing of the row
        with torch.no_grad():
            ref_row = main_output(model(**alone))[0]
        assert (ref[i, :n] - ref_row).abs().max() <= 1e-4 * ref_row.abs().max()
        assert rel_err(row, ref_row) < 0.05  # W8A8 vs the float model on the same row
    assert rel_err(out[0], ref[0]) < 0.05


def test_calibration_data_as_dicts():
    tok = _tokenizer()
    batch = tok(SENTENCES, padding=True, return_tensors="pt", return_token_type_ids=False)
    model = _model("llama")
    calib = [tok(SENTENCES[::-1], padding=True, return_tensors="pt", return_token_type_ids=False)]
    engine = zq.compile(model, batch, "ptq-static", calibration_data=calib, generation=False)
    with torch.no_grad():
        ref = main_output(model(**batch))
    assert rel_err(main_output(engine(batch)), ref) < 0.2


def test_dict_and_example_kwargs_together_is_an_error():
    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long)}
    with pytest.raises(zq.InputError, match="give the inputs once"):
        zq.compile(_model("llama"), batch, "w8a8", example_kwargs=batch, generation=False)
