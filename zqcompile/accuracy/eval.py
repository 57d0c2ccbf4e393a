"""Accuracy evaluation: perplexity of causal LMs (strided windows) and encoder agreement with fp32.

Both take any callable `model_fn(input_ids) -> logits` (or an output with `.logits` / `.last_hidden_state`,
or a tuple whose first element is that): a Hugging Face model, a fake-quantized model
(`zqcompile.accuracy.fakequant`) or a compiled engine. The `zqcompile eval` command lives in `zqcompile/cli/eval.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

ModelFn = Callable[[torch.Tensor], object]


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_sum: float
    num_tokens_scored: int
    num_windows: int
    window: int
    stride: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.num_tokens_scored


def output_tensor(out: object, attr: str = "logits") -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, attr) and getattr(out, attr) is not None:
        return getattr(out, attr)
    if isinstance(out, (tuple, list)):
        return output_tensor(out[0], attr)
    raise TypeError(f"cannot find {attr!r} in a model output of type {type(out).__name__}")


def windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window. Token t is scored from the logits at t-1 of the window that
    first reaches past t; with stride == window (no overlap) each window's first token has no context in
    that window and is not scored: T - num_windows tokens are scored (the usual HF recipe)."""
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, got window={window} stride={stride}")
    out, prev_end, begin = [], 0, 0
    while prev_end < num_tokens:
        end = min(begin + window, num_tokens)
        first = max(begin + 1, prev_end)
        if first < end:
            out.append((begin, end, first))
        prev_end, begin = end, begin + stride
        if end == num_tokens:
            break
    return out


@torch.no_grad()
def perplexity(model_fn: ModelFn, input_ids: torch.Tensor, window: int = 512, stride: int | None = None,
               device: torch.device | str | None = None, progress: bool = False) -> PerplexityResult:
    """exp(mean NLL) of `input_ids` ([T] or [1, T]) under strided windows of `window` tokens.

    stride=None means stride = window: non-overlapping windows (the default; cheaper, slightly higher ppl
    than a sliding window because early tokens of each window see little context)."""
    ids = input_ids.reshape(-1)
    stride = window if stride is None else stride
    spans = windows(ids.numel(), window, stride)
    if not spans:
        raise ValueError(f"need at least 2 tokens to compute perplexity, got {ids.numel()}")
    nll, count = 0.0, 0
    it = spans
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(spans, desc="ppl", unit="window")
    for begin, end, first in it:
        x = ids[begin:end].unsqueeze(0)
        if device is not None:
            x = x.to(device)
        logits = output_tensor(model_fn(x))[0]  # [L, V]
        pred = logits[first - begin - 1:end - begin - 1].float()
        target = x[0, first - begin:end - begin]
        nll += float(F.cross_entropy(pred, target.to(pred.device), reduction="sum"))
        count += end - first
    return PerplexityResult(math.exp(nll / count), nll, count, len(spans), window, stride)


@dataclass(frozen=True)
class AgreementResult:
    cosine_mean: float  # mean over sequences of cos(mean-pooled embedding, fp32's)
    cosine_min: float
    token_cosine_mean: float  # mean over tokens of cos(last hidden state, fp32's)
    num_sequences: int


@torch.no_grad()
def encoder_agreement(reference_fn: ModelFn, model_fn: ModelFn, batches: Sequence[torch.Tensor],
                      attention_masks: Sequence[torch.Tensor] | None = None) -> AgreementResult:
    """How close an encoder's outputs stay to the fp32 reference: cosine similarity of mean-pooled
    sentence embeddings (what sentence-transformers models serve) and of each token's last hidden state."""
    seq_cos, tok_cos = [], []
    for i, ids in enumerate(batches):
        ref = output_tensor(reference_fn(ids), "last_hidden_state").float()
        out = output_tensor(model_fn(ids), "last_hidden_state").float().to(ref.device)
        mask = (attention_masks[i] if attention_masks is not None else torch.ones(ids.shape)).to(ref.device)
        m = mask.unsqueeze(-1).float()
        e_ref, e_out = (ref * m).sum(1) / m.sum(1), (out * m).sum(1) / m.sum(1)
        seq_cos.append(F.cosine_similarity(e_ref, e_out, dim=-1))
        tc = F.cosine_similarity(ref, out, dim=-1)
        tok_cos.append(tc[mask.bool()])
    s, t = torch.cat(seq_cos), torch.cat(tok_cos)
    return AgreementResult(float(s.mean()), float(s.min()), float(t.mean()), s.numel())


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Text -> LongTensor [T] without special tokens (perplexity of the text itself)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
