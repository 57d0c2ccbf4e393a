"""The compressed-tensors checkpoint format as zqcompile reads and writes it, in one place: the quantization
arguments of a scheme, each storage format's tensor names, and the int32 packing of pack-quantized weights.
Only json / torch are needed here (the `compressed-tensors` package is what transformers loads the folders
with; tests compare this packing with its own).

What a checkpoint of this format holds per quantized Linear layer `<layer>` (compressed-tensors 0.20):
- int-quantized (integer weights with quantized input activations): `<layer>.weight` int8 [N, K] (4-bit values
  too, one per byte) and `<layer>.weight_scale` fp32 [N, 1] (strategy channel) or [N, K // group_size] (group);
- pack-quantized (integer weights, float activations): `<layer>.weight_packed` int32 [N, ceil(K * bits / 32)],
  `<layer>.weight_scale` as above, `<layer>.weight_shape` int64 [2] = (N, K);
- float-quantized (FP8 E4M3 weights with FP8 activations): `<layer>.weight` float8_e4m3fn [N, K] and
  `<layer>.weight_scale` fp32 [N, 1] (strategy channel); dynamic per-token activations store no input scale;
- symmetric weights store no zero point; dequantized weight = value * scale (per row, or per K group).
"""
from __future__ import annotations

import math

import torch

QUANT_METHOD = "compressed-tensors"
INT_QUANTIZED, PACK_QUANTIZED, FLOAT_QUANTIZED, MIXED = ("int-quantized", "pack-quantized", "float-quantized",
                                                         "mixed-precision")
NAIVE_QUANTIZED = "naive-quantized"
# Files besides the weights that a Hugging Face folder carries and a server reads (tokenizer, generation defaults).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
              "chat_template.jinja", "chat_template.json", "generation_config.json")


def int_args(bits: int, strategy: str, group_size: int | None = None, dynamic: bool = False) -> dict:
    """QuantizationArgs of symmetric integer quantization, as compressed-tensors writes them."""
    return {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy, "group_size": group_size,
            "dynamic": dynamic}


TOKEN_INPUT = int_args(8, "token", dynamic=True)  # dynamic per-token INT8 activations (zqcompile's A8)


def fp8_args(strategy: str, dynamic: bool = False) -> dict:
    """QuantizationArgs of FP8 E4M3 (compressed-tensors' type "float", 8 bits), symmetric."""
    return {**int_args(8, strategy, None, dynamic), "type": "float"}


FP8_WEIGHTS, FP8_TOKEN_INPUT = fp8_args("channel"), fp8_args("token", dynamic=True)


def storage_format(input_activations: dict | None) -> str:
    """The format compressed-tensors itself picks for integer weights: int-quantized when the inputs are
    quantized too, else pack-quantized (the weight-only layout vLLM's WNA16 kernels read); FP8 inputs (with FP8
    weights) are float-quantized."""
    if input_activations is not None and input_activations.get("type") == "float":
        return FLOAT_QUANTIZED
    return INT_QUANTIZED if input_activations is not None else PACK_QUANTIZED


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 values [N, K] in [-2^(bits-1), 2^(bits-1)) -> int32 [N, ceil(K * bits / 32)]: each value offset by
    2^(bits-1) to unsigned, element i at bit i * bits of the row's bit string, low bits first (4 and 8 bits:
    32 / bits values per word)."""
    if bits not in (4, 8):
        raise ValueError(f"packing is implemented for 4 and 8 bits, got {bits}")
    n, k = values.shape
    per = 32 // bits
    u = values.to(torch.int64) + (1 << (bits - 1))
    pad = math.ceil(k / per) * per - k
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.reshape(n, -1, per) << (torch.arange(per, dtype=torch.int64) * bits)
    words = u.sum(dim=-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # the same 32 bits as a signed int32
    return words.to(torch.int32).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """pack_int32 undone: int32 words -> int8 values of `shape` [N, K]."""
    if bits not in (4, 8):
        raise ValueError(f"unpacking is implemented for 4 and 8 bits, got {bits}")
    n, k = shape
    per = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    u = (words.unsqueeze(-1) >> (torch.arange(per, dtype=torch.int64) * bits)) & ((1 << bits) - 1)
    return (u.reshape(n, -1)[:, :k] - (1 << (bits - 1))).to(torch.int8)
