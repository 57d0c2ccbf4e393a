"""Typed quantization configuration: schemes per GEMM, presets, and per-module overrides.

A `QuantConfig` says how every GEMM of a model is quantized: a default `GemmScheme`, a scheme per GEMM
role (attention QKV, attention output, MLP fc1/fc2, head), and an ordered list of overrides keyed by
module-FQN regex or module type (ZeroQuant-HERO's mode switch: any GEMM may stay floating point).
Presets are named constructors. `resolve_scheme` is the one place that decides a GEMM's scheme; the
compile plan records which rule decided it so the report can say why.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Literal, Mapping, Sequence, Union

from zqcompile.errors import ConfigError, ConfigWarning  # noqa: F401 - raised here, defined there

GemmRole = Literal["qkv", "attn_out", "fc1", "fc2", "head", "router", "other"]
ROLES: tuple[str, ...] = ("qkv", "attn_out", "fc1", "fc2", "head", "router", "other")


# ---- field checks shared by the config dataclasses (each runs in __post_init__, so replace() checks too) ---
def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(owner: str, name: str, v: object, minimum: int, optional: bool = False) -> None:
    if optional and v is None:
        return
    if not _is_int(v) or v < minimum:
        none = "None or " if optional else ""
        raise ConfigError(f"{owner}.{name} must be {none}an integer >= {minimum}, got {v!r}")


def _check_bool(owner: str, name: str, v: object) -> None:
    if not isinstance(v, bool):
        raise ConfigError(f"{owner}.{name} must be True or False, got {v!r}")


def _check_choice(owner: str, name: str, v: object, choices: Sequence) -> None:
    if not any(v is c or (type(v) is type(c) and v == c) for c in choices):
        raise ConfigError(f"{owner}.{name} must be one of {', '.join(map(repr, choices))}, got {v!r}")


@dataclass(frozen=True)
class WeightQuant:
    """Symmetric weight quantization of a [N, K] weight.

    granularity:
      - "row_groups": ZeroQuant's group-wise scheme, groups of output rows (one scale per group; the
        GEMM epilogue applies it). num_groups=None means one group per row (per-channel).
      - "k_groups": groups of `group_size` consecutive elements along K per row (INT4 schemes); the
        GEMM mainloop applies these scales.
      - "tensor": one scale for the whole matrix (the static PTQ baseline).

    dtype: "int" (the values are integers of `bits` bits) or "fp8" (FP8 E4M3 values, one scale per output row
    = max|w_row| / 448: Hopper's FP8 tensor cores; needs bits=8, per-row scales and FP8 activations).

    group_scales (INT4 K groups only): "fp32", each K group's scale max|w_group| / 7; or "two-level", each rounded
    up to an integer multiple u (1..15) of a per-row base (QServe's progressive group quantization), so that
    code x u is an exact int8: past M = 64 tokens (128 where N > K) on sm_90 the weight is unpacked per call and
    the CUTLASS INT8 GEMM runs it (kernel sm90_two_level; ZQ_GEMM_TWO_LEVEL=0 turns it off); below that the
    K-group kernels read them as fp32 K-group scales. The "w4/8a8" preset uses them. SmolLM2-135M W4/8A8
    perplexity 28.94 against 29.68 with fp32 group scales (bench/accuracy/README.md).
    """

    bits: int = 8
    granularity: Literal["row_groups", "k_groups", "tensor"] = "row_groups"
    num_groups: int | None = None
    group_size: int | None = None
    symmetric: bool = True
    dtype: Literal["int", "fp8"] = "int"
    group_scales: Literal["fp32", "two-level"] = "fp32"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not _is_int(self.bits) or self.bits not in (4, 8):
            raise ConfigError(f"WeightQuant.bits must be 4 or 8, got {self.bits!r}")
        if self.granularity not in ("row_groups", "k_groups", "tensor"):
            raise ConfigError(f"WeightQuant.granularity must be 'row_groups', 'k_groups' or 'tensor', "
                              f"got {self.granularity!r}")
        _check_bool("WeightQuant", "symmetric", self.symmetric)
        if not self.symmetric:
            raise ConfigError("WeightQuant.symmetric=False: only symmetric weight quantization is implemented "
                              "(ZeroQuant uses symmetric)")
        _check_int("WeightQuant", "num_groups", self.num_groups, 1, optional=True)
        _check_int("WeightQuant", "group_size", self.group_size, 1, optional=True)
        # A field the granularity does not read would be silently ignored: say which one applies.
        if self.num_groups is not None and self.granularity != "row_groups":
            raise ConfigError(f"WeightQuant.num_groups={self.num_groups} only applies to granularity='row_groups' "
                              f"(got {self.granularity!r}); for K groups set group_size instead")
        if self.group_size is not None and self.granularity != "k_groups":
            raise ConfigError(f"WeightQuant.group_size={self.group_size} only applies to granularity='k_groups' "
                              f"(got {self.granularity!r}); for row groups set num_groups instead")
        if self.granularity == "k_groups" and self.group_size is not None and self.group_size % 2 and self.bits == 4:
            raise ConfigError(f"WeightQuant.group_size: INT4 k-groups must have an even group_size "
                              f"(two values per byte), got {self.group_size}")
        _check_choice("WeightQuant", "dtype", self.dtype, ("int", "fp8"))
        _check_choice("WeightQuant", "group_scales", self.group_scales, ("fp32", "two-level"))
        if self.group_scales == "two-level" and (self.bits != 4 or self.granularity != "k_groups"):
            raise ConfigError(f"WeightQuant(group_scales='two-level') rounds INT4 K-group scales to multiples of a "
                              f"row scale: it needs bits=4 and granularity='k_groups', got bits={self.bits}, "
                              f"granularity={self.granularity!r}")
        if self.dtype == "fp8" and (self.bits != 8 or self.granularity != "row_groups" or self.num_groups is not None):
            raise ConfigError(f"WeightQuant(dtype='fp8') is FP8 E4M3 with one scale per output row: it needs bits=8 "
                              f"and granularity='row_groups' without num_groups, got bits={self.bits}, "
                              f"granularity={self.granularity!r}, num_groups={self.num_groups!r}")

    def describe(self) -> str:
        if self.dtype == "fp8":
            return "FP8 E4M3 per-row"
        if self.granularity == "row_groups":
            g = "per-row" if self.num_groups is None else f"{self.num_groups} row groups"
        elif self.granularity == "k_groups":
            g = f"K groups of {self.group_size}" if self.group_size else "K groups of 128 (or the largest power of two dividing K)"
            g += ", two-level scales" if self.group_scales == "two-level" else ""
        else:
            g = "per-tensor"
        return f"INT{self.bits} {g}"


@dataclass(frozen=True)
class ActQuant:
    """Activation quantization at a GEMM input.

    mode: "token" = dynamic per-token INT8 (scale = max|row| / 127 at run time, no calibration);
    "tensor" = static per-tensor INT8 with a range calibrated on sample inputs; "none" = float input.
    dtype: "int" (INT8 codes) or "fp8" (FP8 E4M3 codes, dynamic per token: scale = max|row| / 448; mode "token"
    only).
    """

    mode: Literal["token", "tensor", "none"] = "token"
    bits: int = 8
    dtype: Literal["int", "fp8"] = "int"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.mode not in ("token", "tensor", "none"):
            raise ConfigError(f"ActQuant.mode must be 'token', 'tensor' or 'none', got {self.mode!r}")
        if not _is_int(self.bits) or self.bits != 8:
            raise ConfigError(f"ActQuant.bits: only 8-bit activations are implemented, got {self.bits!r}")
        _check_choice("ActQuant", "dtype", self.dtype, ("int", "fp8"))
        if self.dtype == "fp8" and self.mode != "token":
            raise ConfigError(f"ActQuant(dtype='fp8') is dynamic per-token FP8 E4M3 (scale = max|row| / 448): it needs "
                              f"mode='token', got mode={self.mode!r} (static per-tensor FP8 is not implemented)")

    def describe(self) -> str:
        if self.mode == "none":
            return "A16"
        if self.dtype == "fp8":
            return "A FP8 E4M3 per-token"
        return {"token": "A8 per-token", "tensor": "A8 static per-tensor"}[self.mode]


@dataclass(frozen=True)
class GemmScheme:
    """How one GEMM runs. weight=None keeps the GEMM in floating point (float_dtype: None = the model's
    dtype, or "fp16"/"bf16" to run just this GEMM in that dtype)."""

    weight: WeightQuant | None = field(default_factory=WeightQuant)
    act: ActQuant = field(default_factory=ActQuant)
    float_dtype: Literal["fp16", "bf16"] | None = None

    @property
    def is_float(self) -> bool:
        return self.weight is None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.weight is not None and not isinstance(self.weight, WeightQuant):
            raise ConfigError(f"GemmScheme.weight must be a WeightQuant or None (floating point), "
                              f"got {type(self.weight).__name__} {self.weight!r}")
        if not isinstance(self.act, ActQuant):
            raise ConfigError(f"GemmScheme.act must be an ActQuant, got {type(self.act).__name__} {self.act!r}")
        if self.weight is None:
            if self.act.mode != "none":
                raise ConfigError(f"GemmScheme: a floating-point GEMM (weight=None) cannot quantize its activations "
                                  f"(act mode {self.act.mode!r}); use act=ActQuant('none'), or the scheme name 'fp'")
        else:
            self.weight.validate()
            _check_fp8_pair(self.weight, self.act)
        self.act.validate()
        _check_choice("GemmScheme", "float_dtype", self.float_dtype, (None, "fp16", "bf16"))
        if self.float_dtype is not None and self.weight is not None:
            raise ConfigError(f"GemmScheme.float_dtype={self.float_dtype!r} only applies to a floating-point GEMM "
                              f"(weight=None); a quantized GEMM runs in the model's dtype")

    def describe(self) -> str:
        if self.weight is None:
            return f"FP ({self.float_dtype or 'model dtype'})"
        return f"W: {self.weight.describe()} | {self.act.describe()}"


def _check_fp8_pair(weight: WeightQuant, act: ActQuant) -> None:
    """FP8 weights only multiply FP8 activations (Hopper's FP8 GEMM takes E4M3 x E4M3); FP8 activations take FP8
    or INT8 weights (INT8 weights: the activation is rounded to FP8, dequantized, then the A16 INT8-weight GEMM)."""
    if weight.dtype == "fp8" and act.dtype != "fp8":
        raise ConfigError(f"GemmScheme: FP8 weights need FP8 activations (act=ActQuant(dtype='fp8')), got "
                          f"{act.describe()}; for INT8 activations use INT8 weights (preset 'w8a8')")
    if act.dtype == "fp8" and weight.dtype == "int" and weight.bits != 8:
        raise ConfigError(f"GemmScheme: FP8 activations take FP8 or INT8 weights, got {weight.describe()}; use "
                          f"WeightQuant(8) or WeightQuant(dtype='fp8')")


FP = GemmScheme(weight=None, act=ActQuant("none"))
FP16 = GemmScheme(weight=None, act=ActQuant("none"), float_dtype="fp16")
BF16 = GemmScheme(weight=None, act=ActQuant("none"), float_dtype="bf16")
SCHEME_NAMES: dict[str, GemmScheme] = {
    "fp": FP, "fp16": FP16, "bf16": BF16,
    "w8a8": GemmScheme(WeightQuant(8), ActQuant("token")),
    "w8a16": GemmScheme(WeightQuant(8), ActQuant("none")),
    "w4a8": GemmScheme(WeightQuant(4, "k_groups"), ActQuant("token")),
    "w4a16": GemmScheme(WeightQuant(4, "k_groups"), ActQuant("none")),
    "fp8": GemmScheme(WeightQuant(dtype="fp8"), ActQuant("token", dtype="fp8")),
    "w8a8-fp8act": GemmScheme(WeightQuant(8), ActQuant("token", dtype="fp8")),
}

OverrideKey = Union[str, type]


@dataclass(frozen=True)
class LKDConfig:
    """Layer-by-layer knowledge distillation (ZeroQuant Sec. 4.2); used by zqcompile.accuracy.lkd.

    data: "auto" (the default: "generated" for a causal LM, "random" for other models), "random" (uniform
    random token ids, the paper's data-free variant), "generated" (data-free too:
    sequences sampled from the fp model from random first tokens, causal LMs only), a text string (tokenized
    with the model's tokenizer), or a list of LongTensor token batches. LKD keeps `num_batches` batches of
    [batch_size, seq_len] tokens and cycles through them for `steps` Adam steps per block. The tuning fields
    (lr, clip_lr, schedule, student_input) left at None depend on the data (LKD_TUNING): uniform random ids get
    conservative ones, sampled data 32 batches. On SmolLM2 W4/8A8 (bench/accuracy/README.md, untuned 29.58) text
    recovers 68% of the perplexity gap, "generated" 55% (25.42), "random" 35% (26.94; 40.97 with the text
    settings): give text where there is any.
    """

    data: object = "auto"
    steps: int = 100
    # lr, clip_lr, schedule, student_input, num_batches: None takes LKD_TUNING's value for the data (resolved_for)
    lr: float | None = None  # Adam lr of the block's weights (bench/accuracy/lkd_diag.py: 1e-4 and 1e-3 do worse)
    batch_size: int = 4
    seq_len: int = 128
    num_batches: int | None = None
    loss: Literal["mse"] = "mse"
    seed: int = 0
    progress: bool = True
    clip_lr: float | None = None  # Adam lr of one learned clipping factor per INT weight group; 0: max-based scales
    clip_min: float = 0.5  # the clipping factors stay in [clip_min, 1] (1: the engine's max|w_group| scale)
    schedule: Literal["constant", "cosine"] | None = None  # cosine: lr decays to 0 over `steps`
    student_input: Literal["fp", "quantized"] | None = None
    # data="generated" only: the fp model's next-token distribution is sampled at this temperature, from its
    # smallest top-p set (1.0: the whole vocabulary). 1, 1: plain sampling (LLM-QAT); 0.8 / 0.95 did worse on SmolLM2.
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        data = self.data
        if isinstance(data, str):
            if not data.strip():
                raise ConfigError("LKDConfig.data is an empty string; give 'auto', 'random', 'generated', a text, "
                                  "or token batches")
        elif isinstance(data, (list, tuple)):
            if not data:
                raise ConfigError("LKDConfig.data is an empty list; give at least one LongTensor token batch")
            import torch  # only a token-batch list needs it; the rest of config stays torch-free (CLI start-up)
            for i, b in enumerate(data):
                if not isinstance(b, torch.Tensor) or b.dtype not in (torch.long, torch.int32) or b.dim() not in (1, 2) \
                        or b.numel() == 0:
                    what = (f"{b.dtype} tensor of shape {tuple(b.shape)}" if isinstance(b, torch.Tensor)
                            else type(b).__name__)
                    raise ConfigError(f"LKDConfig.data[{i}] must be a non-empty integer token tensor [batch, seq] "
                                      f"or [seq], got {what}")
        else:
            raise ConfigError(f"LKDConfig.data must be 'random', a text string, or a list of LongTensor token "
                              f"batches, got {type(data).__name__}")
        _check_int("LKDConfig", "steps", self.steps, 0)
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not math.isfinite(self.lr) or self.lr <= 0):
            raise ConfigError(f"LKDConfig.lr must be a finite number > 0, got {self.lr!r}")
        for name in ("batch_size", "seq_len", "num_batches"):
            if name != "num_batches" or self.num_batches is not None:
                _check_int("LKDConfig", name, getattr(self, name), 1)
        _check_choice("LKDConfig", "loss", self.loss, ("mse",))
        if not _is_int(self.seed):
            raise ConfigError(f"LKDConfig.seed must be an integer, got {self.seed!r}")
        _check_bool("LKDConfig", "progress", self.progress)
        if self.clip_lr is not None and (isinstance(self.clip_lr, bool) or not isinstance(self.clip_lr, (int, float))
                                         or not math.isfinite(self.clip_lr) or self.clip_lr < 0):
            raise ConfigError(f"LKDConfig.clip_lr must be a finite number >= 0 (0: no learned clipping), "
                              f"got {self.clip_lr!r}")
        if isinstance(self.clip_min, bool) or not isinstance(self.clip_min, (int, float)) \
                or not 0 < self.clip_min <= 1:
            raise ConfigError(f"LKDConfig.clip_min must be a number in (0, 1], got {self.clip_min!r}")
        _check_choice("LKDConfig", "schedule", self.schedule, ("constant", "cosine", None))
        _check_choice("LKDConfig", "student_input", self.student_input, ("fp", "quantized", None))
        for name, hi in (("temperature", math.inf), ("top_p", 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= hi:
                raise ConfigError(f"LKDConfig.{name} must be a number in (0, {hi}], got {v!r}")

    def resolved_for(self, data: object) -> "LKDConfig":
        """This config with the fields left at None set from LKD_TUNING for `data` (with "auto" already resolved):
        "random", "generated", or anything else (text, token batches)."""
        own = LKD_TUNING[data if isinstance(data, str) and data in ("random", "generated") else "default"]
        return replace(self, **{k: v for k, v in own.items() if getattr(self, k) is None})


# LKD's tuning per kind of data. Text and sampled data: weights lr 3e-4 cosine + learned clipping, the student fed
# by the tuned quantized blocks (issue 14). Uniform random ids: on the real SmolLM2 those settings fit hidden states
# real text never gives (W4/8A8 ppl 40.97, untuned 29.58); the earlier conservative ones give 26.94
# (bench/accuracy/README.md, "Data-free LKD").
# Sampled data: 32 batches (25.42 on SmolLM2; 16 batches 26.10, 8 batches 26.88), the data it fits is sampled, not
# given; more of it kept helping.
_LKD_TEXT_TUNING = dict(lr=3e-4, clip_lr=5e-3, schedule="cosine", student_input="quantized", num_batches=8)
LKD_TUNING = {
    "default": _LKD_TEXT_TUNING,
    "generated": {**_LKD_TEXT_TUNING, "num_batches": 32},
    "random": dict(lr=1e-4, clip_lr=0.0, schedule="constant", student_input="fp", num_batches=8),
}


@dataclass(frozen=True)
class FeatureScales:
    """ZeroQuant-HERO's feature-wise quantization (passes/feature_scales.py): per-input-channel scales
    s = max|X_j|^alpha / max|W_j|^(1 - alpha) moved from the activations into the weights and folded into the
    producer (norm weight, up projection rows), free at run time.

    alpha: one value for every site, or None to search `alphas` on the calibration data: `search="model"`
    picks one alpha for every site (or none at all) by the fake-quantized graph's output error, `"site"` one
    per site by the error of that site's quantized GEMMs (the unscaled GEMM is a candidate too).
    Calibration uses the compile's `calibration_data`, else `random_batches` batches of `random_batch` x
    `random_seq` random tokens; at most `max_tokens` rows per site (and tokens for the model search) are used.
    norm_copies: a norm whose output also feeds something else (post-LN BERT: the residual) is computed twice,
    as it is for the residual and with weight (and bias) / s for the GEMMs (their quantization fused into it):
    one more norm per site (a memory-bound op), and such an engine cannot be exported to compressed-tensors.
    False: those sites are skipped, as before.
    """

    alpha: float | None = None
    alphas: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    search: str = "model"
    max_tokens: int = 1024
    norm_copies: bool = True
    random_batches: int = 4
    random_batch: int = 2
    random_seq: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for a in ((self.alpha,) if self.alpha is not None else ()) + tuple(self.alphas):
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1:
                raise ConfigError(f"FeatureScales alpha values must be numbers in [0, 1], got {a!r}")
        if self.search not in ("model", "site"):
            raise ConfigError(f"FeatureScales.search must be 'model' or 'site', got {self.search!r}")
        if not isinstance(self.alphas, tuple) or not self.alphas:
            raise ConfigError(f"FeatureScales.alphas must be a non-empty tuple of numbers in [0, 1], "
                              f"got {self.alphas!r}")
        for name in ("max_tokens", "random_batches", "random_batch", "random_seq"):
            _check_int("FeatureScales", name, getattr(self, name), 1)
        if not _is_int(self.seed):
            raise ConfigError(f"FeatureScales.seed must be an integer, got {self.seed!r}")
        _check_bool("FeatureScales", "norm_copies", self.norm_copies)


@dataclass(frozen=True)
class AccuracyBudget:
    """HERO's per-module mode switch chosen automatically (passes/mixed_precision.py): the fewest GEMMs are
    kept in FP16 for which the fake-quantized graph stays within `budget` of the float graph on the calibration
    data (at most `max_tokens` tokens of it). `metric` "kl" (causal LMs): the expected perplexity increase,
    exp(mean KL(float || quantized) of the next-token distributions) - 1 (0.01 = +1%); "cosine" (encoders):
    1 - the least cosine of a sentence's mean-pooled embedding to float's (0.01 = min cosine 0.99); "auto":
    kl for a causal LM, else cosine. GEMMs are ranked by what keeping each group of GEMMs on one input in float
    recovers on the first `rank_tokens` tokens (one fake-quantized forward per group, 4 per LLaMA layer).
    `feature_scales`: when the config has none, HERO's feature-wise scales (FeatureScales()) are applied first,
    so that fewer GEMMs need FP16."""

    budget: float = 0.01
    max_tokens: int = 2048
    rank_tokens: int = 256
    metric: str = "auto"
    feature_scales: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not 0 < self.budget < 1:
            raise ConfigError(f"accuracy_budget must be a fraction in (0, 1), e.g. 0.01 for +1% perplexity, "
                              f"got {self.budget!r}")
        _check_int("AccuracyBudget", "max_tokens", self.max_tokens, 2)
        _check_int("AccuracyBudget", "rank_tokens", self.rank_tokens, 2)
        if self.metric not in ("auto", "kl", "cosine"):
            raise ConfigError(f"AccuracyBudget.metric must be 'auto', 'kl' or 'cosine', got {self.metric!r}")
        _check_bool("AccuracyBudget", "feature_scales", self.feature_scales)


@dataclass(frozen=True)
class AttentionQuant:
    """ZeroQuant-HERO's quantized attention (passes/quantize_attention.py): the attention products Q.K^T and
    P.V run on 8-bit codes with dynamic scales: granularity "head" -- Q, K and V one per (batch row, head);
    "token" -- Q and K one per token of each head, V one per channel of each head (the scales an INT8 GEMM's
    epilogue applies); the softmax output P one per query row either way. dtype "int8" (scale = max / 127) or
    "fp8" (FP8 E4M3, max / 448). Every attention of the model (SDPA in the engine graph, the KV-cache attention
    of the generation graphs). dtype "int8-fp8": Q.K^T on INT8, P.V on FP8 (the softmax's small probabilities
    keep their precision; both map to tensor-core formats). The defaults, "int8-fp8" at "token", lost the least on
    SmolLM2-135M (README, "ZeroQuant-HERO's quantized attention": +0.36% perplexity alone, against +1.51% for INT8
    at either granularity). Off (QuantConfig.attention None) by default."""

    dtype: Literal["int8", "fp8", "int8-fp8"] = "int8-fp8"
    granularity: Literal["head", "token"] = "token"

    def __post_init__(self) -> None:
        _check_choice("AttentionQuant", "dtype", self.dtype, ("int8", "fp8", "int8-fp8"))
        _check_choice("AttentionQuant", "granularity", self.granularity, ("head", "token"))


@dataclass(frozen=True)
class QuantConfig:
    """The whole quantization recipe. `overrides` is ordered: the first matching key wins.

    A key is a regex matched (re.search) against the GEMM's module FQN, or a module class matched against
    the GEMM's module and its ancestors. A value is a GemmScheme or one of SCHEME_NAMES ("fp16", "w8a8"...).
    """

    name: str = "custom"
    default: GemmScheme = field(default_factory=GemmScheme)
    roles: Mapping[str, GemmScheme] = field(default_factory=dict)
    overrides: Sequence[tuple[OverrideKey, GemmScheme | str]] = ()
    calibration_batches: int = 4
    merge_gemms: bool = True  # q/k/v (and gate/up) with one input and one scheme run as one GEMM
    dynamic_batch: bool = True
    dynamic_seq: bool = True
    feature_scales: FeatureScales | None = None  # HERO's feature-wise scales (None: off)
    accuracy_budget: AccuracyBudget | None = None  # GEMMs kept in FP16 to a perplexity budget (None: off)
    attention: AttentionQuant | None = None  # HERO's quantized attention products (None: float attention)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"QuantConfig.name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.default, GemmScheme):
            raise ConfigError(f"QuantConfig.default must be a GemmScheme, got {type(self.default).__name__} "
                              f"{self.default!r}{_scheme_name_hint(self.default)}")
        self.default.validate()
        if not isinstance(self.roles, Mapping):
            raise ConfigError(f"QuantConfig.roles must be a mapping role -> GemmScheme, got {type(self.roles).__name__}")
        for role, scheme in self.roles.items():
            if role not in ROLES:
                raise ConfigError(f"QuantConfig.roles: unknown GEMM role {role!r}; roles are {', '.join(ROLES)}")
            if not isinstance(scheme, GemmScheme):
                raise ConfigError(f"QuantConfig.roles[{role!r}] must be a GemmScheme, got {type(scheme).__name__} "
                                  f"{scheme!r}{_scheme_name_hint(scheme)}")
            scheme.validate()
        if isinstance(self.overrides, Mapping) or not isinstance(self.overrides, (list, tuple)):
            raise ConfigError(f"QuantConfig.overrides must be a sequence of (regex or module class, scheme) pairs, "
                              f"got {type(self.overrides).__name__}; from a dict use config.with_overrides({{...}})")
        for i, item in enumerate(self.overrides):
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise ConfigError(f"QuantConfig.overrides[{i}] must be a (regex or module class, scheme) pair, "
                                  f"got {item!r}")
            key, value = item
            if isinstance(key, str):
                try:
                    re.compile(key)
                except re.error as e:
                    raise ConfigError(f"override key {key!r} is not a valid regex: {e}") from None
            elif not isinstance(key, type):
                raise ConfigError(f"override key must be a regex string or a module class, got {key!r}")
            try:
                as_scheme(value).validate()
            except ConfigError as e:
                raise ConfigError(f"override {override_text(key)}: {e}") from None
        _check_int("QuantConfig", "calibration_batches", self.calibration_batches, 1)
        for name in ("merge_gemms", "dynamic_batch", "dynamic_seq"):
            _check_bool("QuantConfig", name, getattr(self, name))
        if self.accuracy_budget is not None and not isinstance(self.accuracy_budget, AccuracyBudget):
            raise ConfigError(f"QuantConfig.accuracy_budget must be an AccuracyBudget or None, got "
                              f"{type(self.accuracy_budget).__name__}")
        if self.feature_scales is not None and not isinstance(self.feature_scales, FeatureScales):
            raise ConfigError(f"QuantConfig.feature_scales must be a FeatureScales or None, got "
                              f"{type(self.feature_scales).__name__}")
        if self.attention is not None and not isinstance(self.attention, AttentionQuant):
            raise ConfigError(f"QuantConfig.attention must be an AttentionQuant or None (e.g. "
                              f"AttentionQuant(dtype='int8')), got {type(self.attention).__name__} {self.attention!r}")

    def with_overrides(self, overrides: Mapping[OverrideKey, GemmScheme | str]) -> "QuantConfig":
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"with_overrides takes a dict {{regex or module class: scheme}}, "
                              f"got {type(overrides).__name__}")
        return replace(self, overrides=tuple(self.overrides) + tuple(overrides.items()))

    @property
    def uses_static_activations(self) -> bool:
        schemes = [self.default, *self.roles.values(), *(as_scheme(v) for _, v in self.overrides)]
        return any(s.act.mode == "tensor" for s in schemes)


def weight_groups_error(fqn: str, shape: tuple[int, int], weight: WeightQuant, reason: str) -> ConfigError:
    """The error for a weight scheme whose groups do not fit one GEMM's [N, K] weight: the module, its shape,
    why, and what would fit (the compiler and fakequant raise this same error)."""
    n, k = shape
    if weight.bits == 4 and k % 2:
        fix = "INT4 cannot pack an odd K: give this module an 8-bit scheme"
    elif weight.granularity == "k_groups":
        sizes = _divisors_at_most(k, weight.group_size or k, even=weight.bits == 4)
        fix = f"choose a group_size that divides K={k} (e.g. {', '.join(map(str, sizes))})"
    elif weight.granularity == "row_groups":
        fix = f"choose a num_groups that divides N={n} (e.g. {', '.join(map(str, _divisors_at_most(n, weight.num_groups or n)))})"
    else:
        fix = "choose another scheme for it"
    return ConfigError(f"cannot quantize {fqn} (weight N x K = {n} x {k}) as {weight.describe()}: {reason}; {fix}, "
                       f"or give this module its own scheme with an override: config.with_overrides({{{fqn!r}: "
                       f"'w8a8'}}), or {{{fqn!r}: 'fp'}} to keep it in floating point")


def _divisors_at_most(m: int, limit: int, even: bool = False, count: int = 4) -> list[int]:
    found = [d for d in range(min(limit, m), 0, -1) if m % d == 0 and not (even and d % 2)]
    return found[:count]


def _scheme_name_hint(value: object) -> str:
    if isinstance(value, str) and value.lower() in SCHEME_NAMES:
        return f"; for a scheme name use zqcompile.config.SCHEME_NAMES[{value.lower()!r}]"
    return ""


def as_scheme(value: GemmScheme | str) -> GemmScheme:
    if isinstance(value, GemmScheme):
        return value
    if isinstance(value, str) and value.lower() in SCHEME_NAMES:
        return SCHEME_NAMES[value.lower()]
    raise ConfigError(f"unknown scheme {value!r}; use a GemmScheme or one of {', '.join(SCHEME_NAMES)}")


# ---- presets ---------------------------------------------------------------------------------------------
# The output head (lm_head / classifier / pooler) stays FP in every preset: ZeroQuant quantizes the
# transformer blocks' GEMMs; a user can quantize the head with an override. So does a mixture-of-experts
# router (a tiny GEMM whose rounding would send tokens to other experts); the experts themselves quantize.
_HEAD_FP = {"head": FP, "router": FP}
_W8 = WeightQuant(8)
_W4 = WeightQuant(4, "k_groups")  # groups of 128 along K, smaller where K needs it
_W4_TWO_LEVEL = WeightQuant(4, "k_groups", group_scales="two-level")  # W4/8A8's MLP: the INT8 GEMM at large M


def _preset_w8a8() -> QuantConfig:
    return QuantConfig("w8a8", GemmScheme(_W8, ActQuant("token")), dict(_HEAD_FP))


def _preset_w8a8_fws() -> QuantConfig:
    # ZeroQuant-HERO's feature-wise quantization on top of W8A8, alpha searched per site
    return replace(_preset_w8a8(), name="w8a8-fws", feature_scales=FeatureScales())


def _preset_fp8() -> QuantConfig:
    # FP8 E4M3 weights (per row) and activations (per token, dynamic): Hopper's FP8 GEMM, no INT rounding
    return QuantConfig("fp8", SCHEME_NAMES["fp8"], dict(_HEAD_FP))


def _preset_w8a8_fp8act() -> QuantConfig:
    # INT8 weights with FP8 E4M3 activations: the activation's outlier tokens keep more relative precision
    return QuantConfig("w8a8-fp8act", SCHEME_NAMES["w8a8-fp8act"], dict(_HEAD_FP))


def _preset_w4_8a8() -> QuantConfig:
    w4 = GemmScheme(_W4_TWO_LEVEL, ActQuant("token"))
    return QuantConfig("w4/8a8", GemmScheme(_W8, ActQuant("token")), {**_HEAD_FP, "fc1": w4, "fc2": w4})


def _preset_w4_8a16() -> QuantConfig:
    w4 = GemmScheme(_W4, ActQuant("none"))
    return QuantConfig("w4/8a16", GemmScheme(_W8, ActQuant("none")), {**_HEAD_FP, "fc1": w4, "fc2": w4})


def _preset_w8a8_16() -> QuantConfig:
    # The paper keeps the attention QKV GEMM's input in FP16 for GPT-NeoX-20B (W8A8/16).
    return QuantConfig("w8a8/16", GemmScheme(_W8, ActQuant("token")),
                       {**_HEAD_FP, "qkv": GemmScheme(_W8, ActQuant("none"))})


def _preset_w8a16() -> QuantConfig:
    return QuantConfig("w8a16", GemmScheme(_W8, ActQuant("none")), dict(_HEAD_FP))


def _preset_ptq_static() -> QuantConfig:
    return QuantConfig("ptq-static", GemmScheme(WeightQuant(8, "tensor"), ActQuant("tensor")), dict(_HEAD_FP))


def _preset_none() -> QuantConfig:
    return QuantConfig("none", FP, {})


PRESETS = {
    "w8a8": _preset_w8a8,
    "w8a8-fws": _preset_w8a8_fws,
    "w4/8a8": _preset_w4_8a8,
    "w4/8a16": _preset_w4_8a16,
    "w8a8/16": _preset_w8a8_16,
    "w8a16": _preset_w8a16,
    "ptq-static": _preset_ptq_static,
    "fp8": _preset_fp8,
    "w8a8-fp8act": _preset_w8a8_fp8act,
    "none": _preset_none,
}


def with_attention(cfg: QuantConfig, dtype: str = "int8-fp8", granularity: str = "token") -> QuantConfig:
    """`cfg` with HERO's quantized attention products in `dtype` ("int8" / "fp8" / "int8-fp8") at `granularity`,
    named so (e.g. "w8a8+attn-int8", "w8a8+attn-int8-fp8-token")."""
    tag = dtype if granularity == "head" else f"{dtype}-{granularity}"
    return replace(cfg, name=f"{cfg.name}+attn-{tag}", attention=AttentionQuant(dtype, granularity))


def get_config(config: "QuantConfig | str") -> QuantConfig:
    """A preset name or a QuantConfig -> a validated QuantConfig."""
    if isinstance(config, QuantConfig):
        cfg = config
    elif isinstance(config, str):
        key = config.strip().lower()
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {config!r}; valid presets: {', '.join(PRESETS)}")
        cfg = PRESETS[key]()
    else:
        raise ConfigError(f"config must be a preset name or a zqcompile.QuantConfig, got {type(config).__name__}")
    cfg.validate()
    return cfg


def override_matches(key: OverrideKey, fqn: str, module_types: Sequence[type | str]) -> bool:
    """Does one override key apply to a GEMM (regex on its FQN, or a class among its module and ancestors)?"""
    if isinstance(key, str):
        return re.search(key, fqn) is not None
    return any(_type_matches(key, t) for t in module_types)


def matching_overrides(config: QuantConfig, fqn: str, module_types: Sequence[type | str]) -> list[int]:
    """Indices of every override that applies to a GEMM; the first one decides it (resolve_scheme)."""
    return [i for i, (key, _) in enumerate(config.overrides) if override_matches(key, fqn, module_types)]


def override_text(key: OverrideKey) -> str:
    """How the report names an override key: the regex in quotes, or 'type ClassName'."""
    return repr(key) if isinstance(key, str) else f"type {key.__name__}"


def resolve_scheme(config: QuantConfig, fqn: str, role: str, module_types: Sequence[type | str]) -> tuple[GemmScheme, str]:
    """Pick one GEMM's scheme; return it with the rule that decided it (shown in the report)."""
    for key, value in config.overrides:
        if override_matches(key, fqn, module_types):
            return as_scheme(value), f"override {override_text(key)}"
    if role in config.roles:
        return config.roles[role], f"{config.name} role {role}"
    return config.default, f"{config.name} default"


def _type_matches(cls: type, t: type | str) -> bool:
    if isinstance(t, type):
        return issubclass(t, cls)
    return t == f"{cls.__module__}.{cls.__qualname__}" or t.rsplit(".", 1)[-1] == cls.__qualname__


# ---- GEMM roles -----------------------------------------------------------------------------------------
# Module-FQN rules, first match wins; covers BERT, GPT-2 (Conv1D), OPT, LLaMA/Qwen2/Mistral and GPT-NeoX names.
ROLE_RULES: tuple[tuple[str, str], ...] = (
    (r"attention\.output\.dense$|attn\.c_proj$|(^|\.)(o_proj|out_proj|attention\.dense)$", "attn_out"),
    (r"(^|\.)(q_proj|k_proj|v_proj|qkv_proj|query|key|value|c_attn|query_key_value|Wqkv)$", "qkv"),
    (r"intermediate\.dense$|mlp\.c_fc$|(^|\.)(fc1|gate_proj|up_proj|gate_up_proj|dense_h_to_4h)$", "fc1"),
    (r"\.output\.dense$|mlp\.c_proj$|(^|\.)(fc2|down_proj|dense_4h_to_h)$", "fc2"),
    (r"(^|\.)(lm_head|classifier|pooler\.dense|score|qa_outputs|embed_out|predictions\.decoder)$", "head"),
    # Qwen2-MoE's per-token sigmoid gate of the shared expert ([1, H]): a gate like the router (which is found by
    # the top-k it feeds, classify_gemms), and a plain float Linear in the serving engines' models
    (r"(^|\.)shared_expert_gate$", "router"),
)


def classify_role(fqn: str) -> str:
    """A GEMM's role in the transformer block from its module FQN ("other" when no rule matches)."""
    for pattern, role in ROLE_RULES:
        if re.search(pattern, fqn):
            return role
    return "other"
