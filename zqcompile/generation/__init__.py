"""Generation with a KV cache: the prefill/decode graphs' capture, their masks, the token loop."""
