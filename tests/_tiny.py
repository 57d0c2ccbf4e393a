"""Small random-init HF models shared by the LKD / eval / inspect tests (hidden 64, 2 layers)."""
from __future__ import annotations

import torch


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64)
    return BertModel(cfg).eval()


def tiny_windowed(family: str, window: int = 16, seed: int = 0, **extra):
    """Causal LMs whose layers attend over a window (or chunk) of `window` tokens: "mistral" (every layer
    sliding), "qwen2", "gemma2" (eager attention) and "gemma3" (layer 0 sliding, layer 1 full), "llama4"
    (layer 0 chunked, layer 1 full)."""
    import transformers as T
    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    common.update(extra)
    mixed = ["sliding_attention", "full_attention"]
    if family == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**common, sliding_window=window)).eval()
    if family == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**common, use_sliding_window=True, sliding_window=window,
                                                 max_window_layers=0, layer_types=mixed)).eval()
    if family == "gemma2":
        return T.Gemma2ForCausalLM(T.Gemma2Config(**common, head_dim=16, sliding_window=window,
                                                   layer_types=mixed)).eval()
    if family == "gemma3":
        return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**common, head_dim=16, sliding_window=window,
                                                       layer_types=mixed)).eval()
    if family == "llama4":
        return T.Llama4ForCausalLM(T.Llama4TextConfig(**common, head_dim=16, intermediate_size_mlp=128,
                                                       attention_chunk_size=window, num_local_experts=2,
                                                       interleave_moe_layer_step=2, no_rope_layers=[1, 0])).eval()
    raise KeyError(family)


def tiny_opt(seed: int = 0):
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=64)
    return OPTForCausalLM(cfg).eval()
