"""A seeded fuzz of configurations and example shapes, valid and invalid, on tiny GPT-2 and Llama: every failure
is a ConfigError or InputError with a readable message, raised before capture; every success runs, gives
finite outputs, and is within the error bound of the precisions its plan says it used."""
from __future__ import annotations

import dataclasses
import random
import re
import time
import warnings

import pytest
import torch

import zqcompile as zq
from zqcompile.config import ActQuant, GemmScheme, QuantConfig, WeightQuant, as_scheme
from zqcompile.models import tiny_model

from .conftest import main_output, rel_err

SEED = 20261201
CASES_PER_FAMILY = 16

# Relative L2 error of the logits vs fp32 eager that each precision may cost on these 2-layer models (measured:
# W8A8 ~0.01, INT4 K-groups ~0.1; FP16/BF16 switches ~1e-3 / 1e-2), with margin. The bound of a plan is the
# largest over its GEMMs.
_BOUNDS = [(r"INT4", 0.3), (r"per-tensor|A8 static", 0.3), (r"row groups", 0.12), (r"INT8", 0.06),
           (r"bf16", 0.03), (r"fp16", 0.01), (r"FP", 1e-4)]


def plan_bound(engine) -> float:
    bound = 1e-4
    for g in engine.record.gemms:
        for pattern, b in _BOUNDS:
            if re.search(pattern, g["scheme"]):
                bound = max(bound, b)
                break
    return bound


def _weight(rng: random.Random) -> WeightQuant:
    bits = rng.choice([8, 8, 4])
    gran = rng.choice(["row_groups", "row_groups", "k_groups", "tensor"])
    kw = {}
    if gran == "row_groups" and rng.random() < 0.4:
        kw["num_groups"] = rng.choice([1, 2, 4, 8])
    if gran == "k_groups" and rng.random() < 0.6:
        kw["group_size"] = rng.choice([16, 32, 64])
    return WeightQuant(bits, gran, **kw)


def _scheme(rng: random.Random, by_name: bool = False):
    """A valid scheme; overrides also take scheme names (by_name), default and roles take GemmSchemes."""
    if rng.random() < 0.2:
        name = rng.choice(["fp16", "bf16", "w8a16", "w4a8", "fp"])
        return name if by_name else as_scheme(name)
    return GemmScheme(_weight(rng), ActQuant(rng.choice(["token", "token", "none", "tensor"])))


# One of these makes a config invalid (at construction, or at compile where it depends on the model's shapes).
_INVALID = [
    lambda: WeightQuant(3), lambda: WeightQuant(16), lambda: WeightQuant(True), lambda: WeightQuant(8, "cols"),
    lambda: WeightQuant(8, num_groups=0), lambda: WeightQuant(8, num_groups=7), lambda: WeightQuant(8, num_groups=2.5),
    lambda: WeightQuant(4, "k_groups", group_size=48), lambda: WeightQuant(4, "k_groups", group_size=256),
    lambda: WeightQuant(4, "k_groups", group_size=-1), lambda: ActQuant("channel"),
    lambda: GemmScheme(None, ActQuant("none"), "fp8"), lambda: GemmScheme(None),
    lambda: QuantConfig(overrides=((r"[unclosed", "fp16"),)), lambda: QuantConfig(overrides=((42, "fp16"),)),
    lambda: QuantConfig(overrides=((r"mlp", "w2a2"),)), lambda: QuantConfig(roles={"ffn": GemmScheme()}),
    lambda: QuantConfig(calibration_batches=0), lambda: zq.get_config("w3a3"),
]


def random_config(rng: random.Random):
    """A thunk building a random config (about a third invalid) and an example shape (some invalid)."""
    invalid = _INVALID[rng.randrange(len(_INVALID))] if rng.random() < 0.35 else None

    def build():
        base = zq.get_config(rng.choice(list(zq.PRESETS))) if rng.random() < 0.3 else QuantConfig("fuzz", _scheme(rng))
        roles = {role: _scheme(rng) for role in rng.sample(["qkv", "attn_out", "fc1", "fc2", "head"], rng.randint(0, 2))}
        keys = [r"\.0\.", r"mlp", r"attn|self_attn", r"layers?\.1\b|h\.1\b", r"no_such_module", torch.nn.Linear]
        overrides = tuple((rng.choice(keys), _scheme(rng, by_name=True)) for _ in range(rng.randint(0, 2)))
        if invalid is not None:
            bad = invalid()  # raises ConfigError itself, or is a scheme that fails on this model
            if isinstance(bad, (WeightQuant, ActQuant)):
                bad = GemmScheme(bad) if isinstance(bad, WeightQuant) else GemmScheme(WeightQuant(), bad)
            if isinstance(bad, GemmScheme):
                overrides += ((r"mlp|attn", bad),)
        return dataclasses.replace(base, roles={**base.roles, **roles}, overrides=base.overrides + overrides,
                                   dynamic_batch=rng.random() < 0.8, dynamic_seq=rng.random() < 0.8,
                                   merge_gemms=rng.random() < 0.7)
    shape = rng.choice([(2, 12), (3, 5), (1, 1), (2, 12), (1, 9)] * 2 + [(0, 8), (2, 0), (2, 300)])
    return build, shape


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fuzzed_configs_fail_cleanly_or_compile_within_bounds(family):
    rng = random.Random(f"{SEED}-{family}")
    model = tiny_model(family)
    outcomes = {"config error": 0, "input error": 0, "compiled": 0}
    for case in range(CASES_PER_FAMILY):
        build, (batch, seq) = random_config(rng)
        x = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(case))
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", zq.ConfigWarning)
                engine = zq.compile(model, (x,), build(), generation=False)
        except zq.ConfigError as e:
            outcomes["config error"] += 1
            assert len(str(e)) > 20 and "\n" not in str(e).strip(), (case, str(e))
            assert time.perf_counter() - t0 < 3, f"case {case}: ConfigError after long work: {e}"
            continue
        except zq.InputError as e:
            outcomes["input error"] += 1
            assert len(str(e)) > 20, (case, str(e))
            assert time.perf_counter() - t0 < 3, f"case {case}: InputError after long work: {e}"
            continue
        outcomes["compiled"] += 1
        shapes = [(batch, seq)]
        if engine.spec.static_batch is None and engine.spec.static_seq is None:
            shapes.append((batch + 1, min(seq + 3, 128)))
        for b, s in shapes:
            test_x = torch.randint(0, 1000, (b, s), generator=torch.Generator().manual_seed(100 + case))
            with torch.no_grad():
                ref = main_output(model(test_x))
            out = main_output(engine(test_x))
            assert torch.isfinite(out).all(), f"case {case}: non-finite outputs"
            err, bound = rel_err(out, ref), plan_bound(engine)
            assert err < bound, f"case {case} ({engine.record.config}) at {(b, s)}: rel err {err:.4f} > {bound}"
    # the fuzz exercises all three outcomes
    assert min(outcomes.values()) >= 2, outcomes
