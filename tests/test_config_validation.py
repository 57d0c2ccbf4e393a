"""Config objects check every field when built (and when dataclasses.replace rebuilds them): the error names
the class, the field, the bad value and the valid choices."""
from dataclasses import replace

import pytest
import torch
from torch import nn

from zqcompile.config import (FP, PRESETS, ActQuant, ConfigError, GemmScheme, LKDConfig, QuantConfig, WeightQuant,
                              get_config)

W4K = dict(bits=4, granularity="k_groups")

BAD = [
    (lambda: WeightQuant(bits=3), r"WeightQuant\.bits must be 4 or 8, got 3"),
    (lambda: WeightQuant(bits=True), r"WeightQuant\.bits must be 4 or 8, got True"),
    (lambda: WeightQuant(bits=8.0), r"WeightQuant\.bits must be 4 or 8, got 8\.0"),
    (lambda: WeightQuant(granularity="cols"), r"granularity must be 'row_groups', 'k_groups' or 'tensor', got 'cols'"),
    (lambda: WeightQuant(num_groups=0), r"WeightQuant\.num_groups must be None or an integer >= 1, got 0"),
    (lambda: WeightQuant(num_groups=2.5), r"WeightQuant\.num_groups must be None or an integer >= 1, got 2\.5"),
    (lambda: WeightQuant(**W4K, group_size=0), r"WeightQuant\.group_size must be None or an integer >= 1, got 0"),
    (lambda: WeightQuant(**W4K, group_size="64"), r"group_size must be None or an integer >= 1, got '64'"),
    (lambda: WeightQuant(**W4K, group_size=33), r"INT4 k-groups must have an even group_size.*got 33"),
    (lambda: WeightQuant(8, group_size=64), r"group_size=64 only applies to granularity='k_groups' \(got 'row_groups'\)"),
    (lambda: WeightQuant(**W4K, num_groups=4), r"num_groups=4 only applies to granularity='row_groups' \(got 'k_groups'\)"),
    (lambda: WeightQuant(symmetric=0), r"WeightQuant\.symmetric must be True or False, got 0"),
    (lambda: ActQuant("dynamic"), r"ActQuant\.mode must be 'token', 'tensor' or 'none', got 'dynamic'"),
    (lambda: ActQuant(bits=4), r"ActQuant\.bits: only 8-bit activations are implemented, got 4"),
    (lambda: GemmScheme(weight=None), r"weight=None\) cannot quantize its activations \(act mode 'token'\)"),
    (lambda: GemmScheme(weight=8), r"GemmScheme\.weight must be a WeightQuant or None.*got int 8"),
    (lambda: GemmScheme(act="token"), r"GemmScheme\.act must be an ActQuant, got str 'token'"),
    (lambda: GemmScheme(None, ActQuant("none"), float_dtype="fp8"),
     r"GemmScheme\.float_dtype must be one of None, 'fp16', 'bf16', got 'fp8'"),
    (lambda: GemmScheme(WeightQuant(), float_dtype="fp16"), r"float_dtype='fp16' only applies to a floating-point GEMM"),
    (lambda: QuantConfig(name=""), r"QuantConfig\.name must be a non-empty string, got ''"),
    (lambda: QuantConfig(default="w8a8"), r"QuantConfig\.default must be a GemmScheme, got str 'w8a8'.*SCHEME_NAMES"),
    (lambda: QuantConfig(roles={"mlp": FP}), r"unknown GEMM role 'mlp'; roles are qkv, attn_out, fc1, fc2, head, router, other"),
    (lambda: QuantConfig(roles={"fc1": "w4a8"}), r"roles\['fc1'\] must be a GemmScheme, got str 'w4a8'"),
    (lambda: QuantConfig(roles=[("fc1", FP)]), r"QuantConfig\.roles must be a mapping role -> GemmScheme, got list"),
    (lambda: QuantConfig(overrides={"lm_head": "fp16"}), r"overrides must be a sequence of .* pairs, got dict; .*with_overrides"),
    (lambda: QuantConfig(overrides=("lm_head",)), r"overrides\[0\] must be a \(regex or module class, scheme\) pair, got 'lm_head'"),
    (lambda: QuantConfig(overrides=(("(lm_head", "fp16"),)), r"override key '\(lm_head' is not a valid regex"),
    (lambda: QuantConfig(overrides=((3, "fp16"),)), r"override key must be a regex string or a module class, got 3"),
    (lambda: QuantConfig(overrides=(("lm_head", "fp4"),)), r"override 'lm_head': unknown scheme 'fp4'; .* fp, fp16, bf16, w8a8"),
    (lambda: QuantConfig(overrides=((nn.Linear, None),)), r"override type Linear: unknown scheme None"),
    (lambda: QuantConfig(calibration_batches=0), r"QuantConfig\.calibration_batches must be an integer >= 1, got 0"),
    (lambda: QuantConfig(calibration_batches=2.0), r"calibration_batches must be an integer >= 1, got 2\.0"),
    (lambda: QuantConfig(merge_gemms="yes"), r"QuantConfig\.merge_gemms must be True or False, got 'yes'"),
    (lambda: QuantConfig(dynamic_batch=1), r"QuantConfig\.dynamic_batch must be True or False, got 1"),
    (lambda: QuantConfig(dynamic_seq=None), r"QuantConfig\.dynamic_seq must be True or False, got None"),
    (lambda: get_config("w8a8").with_overrides([("lm_head", "fp16")]), r"with_overrides takes a dict .*got list"),
    (lambda: LKDConfig(steps=-1), r"LKDConfig\.steps must be an integer >= 0, got -1"),
    (lambda: LKDConfig(steps=1.5), r"LKDConfig\.steps must be an integer >= 0, got 1\.5"),
    (lambda: LKDConfig(lr=0), r"LKDConfig\.lr must be a finite number > 0, got 0"),
    (lambda: LKDConfig(lr=float("nan")), r"LKDConfig\.lr must be a finite number > 0, got nan"),
    (lambda: LKDConfig(batch_size=0), r"LKDConfig\.batch_size must be an integer >= 1, got 0"),
    (lambda: LKDConfig(seq_len=0), r"LKDConfig\.seq_len must be an integer >= 1, got 0"),
    (lambda: LKDConfig(num_batches=0), r"LKDConfig\.num_batches must be an integer >= 1, got 0"),
    (lambda: LKDConfig(data=3), r"LKDConfig\.data must be 'random', a text string, or a list .* got int"),
    (lambda: LKDConfig(data=""), r"LKDConfig\.data is an empty string"),
    (lambda: LKDConfig(data=[]), r"LKDConfig\.data is an empty list"),
    (lambda: LKDConfig(data=[torch.zeros(2, 8)]),
     r"LKDConfig\.data\[0\] must be a non-empty integer token tensor .* got torch\.float32 tensor of shape \(2, 8\)"),
    (lambda: LKDConfig(loss="l1"), r"LKDConfig\.loss must be one of 'mse', got 'l1'"),
]


@pytest.mark.parametrize("build,match", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_field_raises_at_construction(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


def test_replace_validates_too():
    cfg = get_config("w8a8")
    with pytest.raises(ConfigError, match=r"QuantConfig\.calibration_batches must be an integer >= 1, got -2"):
        replace(cfg, calibration_batches=-2)
    with pytest.raises(ConfigError, match=r"WeightQuant\.bits must be 4 or 8, got 3"):
        replace(cfg.default.weight, bits=3)
    with pytest.raises(ConfigError, match=r"LKDConfig\.lr must be a finite number > 0, got -0\.1"):
        replace(LKDConfig(), lr=-0.1)


def test_valid_configs_still_build_and_validate():
    for name in PRESETS:
        cfg = get_config(name)
        cfg.validate()  # the old entry point keeps working
        assert cfg.name == name
    w4 = GemmScheme(WeightQuant(4, "k_groups", group_size=32))
    cfg = get_config("w8a8").with_overrides({r"lm_head": "fp16", nn.Linear: w4})
    assert [k for k, _ in cfg.overrides] == [r"lm_head", nn.Linear]
    lkd = LKDConfig(data=[torch.zeros(2, 8, dtype=torch.long)], steps=0, lr=1)
    assert lkd.steps == 0 and lkd.lr == 1
