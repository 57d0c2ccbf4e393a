"""How far a quantized graph's output is from the float graph's, as the accuracy budget (passes/mixed_precision.py)
measures it, for the prediction in the compiler and the measurement through the engine alike:
- "kl" (causal LMs): per token, KL(float || quantized) of the next-token distributions; the loss is their mean and
  the predicted perplexity increase exp(loss) - 1 (the expected one on text the float model would write). On a
  few hundred tokens the measured perplexity change of a small quantized model is dominated by which tokens
  happen to flip (SmolLM2 W8A8, Apache-2.0 per 255 tokens: log-perplexity change 0.006 to 0.11); the KL, a mean
  of non-negative terms, varies far less (0.033 to 0.084) and on 2,048 tokens it predicts GPL-3's change
  (KL 0.047, measured 0.046).
- "cosine" (encoders): per sentence, the cosine of its mean-pooled embedding (over the attention mask) to
  float's; the loss is 1 - the least cosine, which is also the "increase" held to the budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class BudgetMetric:
    kind: str  # "kl" | "cosine"
    mask_index: Optional[int] = None  # position of the attention mask among the inputs (cosine), None: every token

    def reference(self, out: torch.Tensor, inputs: tuple) -> torch.Tensor:
        """What the float output is kept as: log-probabilities [B, T, V], or pooled embeddings [B, H]."""
        return out.float().log_softmax(-1) if self.kind == "kl" else self._pooled(out, inputs)

    def values(self, out: torch.Tensor, ref: torch.Tensor, inputs: tuple) -> torch.Tensor:
        """Per token KL (kl) or per sentence cosine (cosine) of `out` against the reference, flat."""
        if self.kind == "kl":
            lq = out.float().log_softmax(-1).to(ref.device)
            return (ref.exp() * (ref - lq)).sum(-1).reshape(-1)
        return F.cosine_similarity(self._pooled(out, inputs).to(ref.device), ref, dim=-1).reshape(-1)

    def loss(self, values: list[torch.Tensor]) -> float:
        v = torch.cat(values)
        return float(v.mean()) if self.kind == "kl" else 1.0 - float(v.min())

    def increase(self, loss: float) -> float:
        """The loss as the budget reads it: a relative perplexity increase (kl) or 1 - min cosine."""
        return math.expm1(loss) if self.kind == "kl" else loss

    def describe(self, loss: float) -> str:
        return f"KL {loss:.4g} ({self.increase(loss):+.2%} perplexity)" if self.kind == "kl" \
            else f"min cosine {1 - loss:.6f}"

    def budget_text(self, budget: float) -> str:
        return f"budget {budget:.3g}: " + (f"{budget:+.2%} perplexity" if self.kind == "kl"
                                             else f"min cosine {1 - budget:.6g}")

    def _pooled(self, out: torch.Tensor, inputs: tuple) -> torch.Tensor:
        out = out.float()
        if self.mask_index is None or self.mask_index >= len(inputs):
            return out.mean(1)
        m = inputs[self.mask_index].to(out.device, torch.float32)[..., None]
        return (out * m).sum(1) / m.sum(1).clamp_min(1)


def metric_for(kind: str, input_names: Sequence[str]) -> BudgetMetric:
    """The metric of `kind` ("auto" is kl) for a graph whose inputs have these names (an encoder's attention
    mask is the input of that name)."""
    names = list(input_names)
    return BudgetMetric("kl" if kind == "auto" else kind,
                        names.index("attention_mask") if "attention_mask" in names else None)
