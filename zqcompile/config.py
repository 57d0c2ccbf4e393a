"""Typed quantization configuration: schemes per GEMM, presets, and per-module overrides.

A `QuantConfig` says how every GEMM of a model is quantized: a default `GemmScheme`, a scheme per GEMM
role (attention QKV, attention output, MLP fc1/fc2, head), and an ordered list of overrides keyed by
module-FQN regex or module type (ZeroQuant-HERO's mode switch: any GEMM may stay floating point).
Presets are named constructors. `resolve_scheme` is the one place that decides a GEMM's scheme; the
compile plan records which rule decided it so the report can say why.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Literal, Mapping, Sequence, Union

GemmRole = Literal["qkv", "attn_out", "fc1", "fc2", "head", "other"]
ROLES: tuple[str, ...] = ("qkv", "attn_out", "fc1", "fc2", "head", "other")


class ConfigError(ValueError):
    """An invalid quantization configuration (raised before any graph work starts)."""


@dataclass(frozen=True)
class WeightQuant:
    """Symmetric weight quantization of a [N, K] weight.

    granularity:
      - "row_groups": ZeroQuant's group-wise scheme, groups of output rows (one scale per group; the
        GEMM epilogue applies it). num_groups=None means one group per row (per-channel).
      - "k_groups": groups of `group_size` consecutive elements along K per row (INT4 schemes); the
        GEMM mainloop applies these scales.
      - "tensor": one scale for the whole matrix (the static PTQ baseline).
    """

    bits: int = 8
    granularity: Literal["row_groups", "k_groups", "tensor"] = "row_groups"
    num_groups: int | None = None
    group_size: int | None = None
    symmetric: bool = True

    def validate(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"weight bits must be 4 or 8, got {self.bits}")
        if self.granularity not in ("row_groups", "k_groups", "tensor"):
            raise ConfigError(
                f"weight granularity must be 'row_groups', 'k_groups' or 'tensor', got {self.granularity!r}")
        if not self.symmetric:
            raise ConfigError("only symmetric weight quantization is implemented (ZeroQuant uses symmetric)")
        if self.num_groups is not None and self.num_groups < 1:
            raise ConfigError(f"num_groups must be >= 1, got {self.num_groups}")
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"group_size must be >= 1, got {self.group_size}")
        if self.granularity == "k_groups" and self.group_size is not None and self.group_size % 2 and self.bits == 4:
            raise ConfigError(f"INT4 k-groups must have an even group_size, got {self.group_size}")

    def describe(self) -> str:
        if self.granularity == "row_groups":
            g = "per-row" if self.num_groups is None else f"{self.num_groups} row groups"
        elif self.granularity == "k_groups":
            g = f"K groups of {self.group_size}" if self.group_size else "K groups of 128 (or the largest power of two dividing K)"
        else:
            g = "per-tensor"
        return f"INT{self.bits} {g}"


@dataclass(frozen=True)
class ActQuant:
    """Activation quantization at a GEMM input.

    mode: "token" = dynamic per-token INT8 (scale = max|row| / 127 at run time, no calibration);
    "tensor" = static per-tensor INT8 with a range calibrated on sample inputs; "none" = float input.
    """

    mode: Literal["token", "tensor", "none"] = "token"
    bits: int = 8

    def validate(self) -> None:
        if self.mode not in ("token", "tensor", "none"):
            raise ConfigError(f"activation mode must be 'token', 'tensor' or 'none', got {self.mode!r}")
        if self.bits != 8:
            raise ConfigError(f"only 8-bit activations are implemented, got {self.bits}")


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

    def validate(self) -> None:
        if self.weight is None:
            if self.act.mode != "none":
                raise ConfigError("a floating-point GEMM (weight=None) cannot quantize its activations")
        else:
            self.weight.validate()
        self.act.validate()
        if self.float_dtype not in (None, "fp16", "bf16"):
            raise ConfigError(f"float_dtype must be None, 'fp16' or 'bf16', got {self.float_dtype!r}")

    def describe(self) -> str:
        if self.weight is None:
            return f"FP ({self.float_dtype or 'model dtype'})"
        act = {"token": "A8 per-token", "tensor": "A8 static per-tensor", "none": "A16"}[self.act.mode]
        return f"W: {self.weight.describe()} | {act}"


FP = GemmScheme(weight=None, act=ActQuant("none"))
FP16 = GemmScheme(weight=None, act=ActQuant("none"), float_dtype="fp16")
BF16 = GemmScheme(weight=None, act=ActQuant("none"), float_dtype="bf16")
SCHEME_NAMES: dict[str, GemmScheme] = {
    "fp": FP, "fp16": FP16, "bf16": BF16,
    "w8a8": GemmScheme(WeightQuant(8), ActQuant("token")),
    "w8a16": GemmScheme(WeightQuant(8), ActQuant("none")),
    "w4a8": GemmScheme(WeightQuant(4, "k_groups"), ActQuant("token")),
    "w4a16": GemmScheme(WeightQuant(4, "k_groups"), ActQuant("none")),
}

OverrideKey = Union[str, type]


@dataclass(frozen=True)
class LKDConfig:
    """Layer-by-layer knowledge distillation (ZeroQuant Sec. 4.2); used by zqcompile.lkd.

    data: "random" (uniform random token ids, the paper's data-free variant), a text string (tokenized
    with the model's tokenizer), or a list of LongTensor token batches. LKD keeps `num_batches` batches of
    [batch_size, seq_len] tokens and cycles through them for `steps` Adam steps per block.
    """

    data: object = "random"
    steps: int = 100
    lr: float = 1e-4  # Adam; block MSE on SmolLM2 fell ~2x faster than with 1e-5 (50 steps, 3 blocks)
    batch_size: int = 4
    seq_len: int = 128
    num_batches: int = 8
    loss: Literal["mse"] = "mse"
    seed: int = 0
    progress: bool = True


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

    def validate(self) -> None:
        self.default.validate()
        for role, scheme in self.roles.items():
            if role not in ROLES:
                raise ConfigError(f"unknown GEMM role {role!r}; roles are {', '.join(ROLES)}")
            scheme.validate()
        for key, value in self.overrides:
            if isinstance(key, str):
                try:
                    re.compile(key)
                except re.error as e:
                    raise ConfigError(f"override key {key!r} is not a valid regex: {e}") from None
            elif not isinstance(key, type):
                raise ConfigError(f"override key must be a regex string or a module class, got {key!r}")
            as_scheme(value).validate()
        if self.calibration_batches < 1:
            raise ConfigError("calibration_batches must be >= 1")

    def with_overrides(self, overrides: Mapping[OverrideKey, GemmScheme | str]) -> "QuantConfig":
        return replace(self, overrides=tuple(self.overrides) + tuple(overrides.items()))

    @property
    def uses_static_activations(self) -> bool:
        schemes = [self.default, *self.roles.values(), *(as_scheme(v) for _, v in self.overrides)]
        return any(s.act.mode == "tensor" for s in schemes)


def as_scheme(value: GemmScheme | str) -> GemmScheme:
    if isinstance(value, GemmScheme):
        return value
    if isinstance(value, str) and value.lower() in SCHEME_NAMES:
        return SCHEME_NAMES[value.lower()]
    raise ConfigError(f"unknown scheme {value!r}; use a GemmScheme or one of {', '.join(SCHEME_NAMES)}")


# ---- presets ---------------------------------------------------------------------------------------------
# The output head (lm_head / classifier / pooler) stays FP in every preset: ZeroQuant quantizes the
# transformer blocks' GEMMs; a user can quantize the head with an override.
_HEAD_FP = {"head": FP}
_W8 = WeightQuant(8)
_W4 = WeightQuant(4, "k_groups")  # groups of 128 along K, smaller where K needs it


def _preset_w8a8() -> QuantConfig:
    return QuantConfig("w8a8", GemmScheme(_W8, ActQuant("token")), dict(_HEAD_FP))


def _preset_w4_8a8() -> QuantConfig:
    w4 = GemmScheme(_W4, ActQuant("token"))
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
    "w4/8a8": _preset_w4_8a8,
    "w4/8a16": _preset_w4_8a16,
    "w8a8/16": _preset_w8a8_16,
    "w8a16": _preset_w8a16,
    "ptq-static": _preset_ptq_static,
    "none": _preset_none,
}


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


def resolve_scheme(config: QuantConfig, fqn: str, role: str, module_types: Sequence[type | str]) -> tuple[GemmScheme, str]:
    """Pick one GEMM's scheme; return it with the rule that decided it (shown in the report)."""
    for key, value in config.overrides:
        if isinstance(key, str) and re.search(key, fqn):
            return as_scheme(value), f"override {key!r}"
        if isinstance(key, type) and any(_type_matches(key, t) for t in module_types):
            return as_scheme(value), f"override type {key.__name__}"
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
)


def classify_role(fqn: str) -> str:
    """A GEMM's role in the transformer block from its module FQN ("other" when no rule matches)."""
    for pattern, role in ROLE_RULES:
        if re.search(pattern, fqn):
            return role
    return "other"
