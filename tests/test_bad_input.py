"""Bad input gets a clear error naming the cause, early, and leaves nothing half-written."""
import os

import pytest
import torch
from torch import nn

import zqcompile as zq
from zqcompile.config import GemmScheme, QuantConfig, WeightQuant

from .conftest import engine_for, ids, model_for


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(zq.ConfigError, match="valid presets: w8a8, w8a8-fws, w4/8a8"):
        zq.compile(model_for("gpt2"), (ids(2, 8),), "w3a3")


@pytest.mark.parametrize("bad,match", [
    ({"bits": 5}, "bits must be 4 or 8"),
    ({"symmetric": False}, "only symmetric"),
    ({"granularity": "cols"}, "granularity"),
])
def test_invalid_weight_config(bad, match):
    # Raised when the WeightQuant is built (validated in __post_init__), before any config or compile.
    with pytest.raises(zq.ConfigError, match=match):
        zq.get_config(QuantConfig(default=GemmScheme(WeightQuant(**bad))))


def test_group_size_not_dividing_names_the_module():
    cfg = QuantConfig(default=GemmScheme(WeightQuant(4, "k_groups", group_size=48)))
    with pytest.raises(zq.ConfigError, match=r"transformer\.h\.0\.attn\.c_attn.*group_size=48 does not divide K=64"):
        zq.compile(model_for("gpt2"), (ids(2, 8),), cfg, generation=False)


def test_group_size_larger_than_k_names_the_module_and_what_fits():
    cfg = QuantConfig(default=GemmScheme(WeightQuant(4, "k_groups", group_size=128)))
    msg = (r"cannot quantize transformer\.h\.0\.attn\.c_attn \(weight N x K = 192 x 64\) as INT4 K groups of 128: "
           r"group_size=128 is larger than K=64 .*choose a group_size that divides K=64 \(e\.g\. 64, 32, 16, 8\), "
           r"or .*with_overrides\(\{'transformer\.h\.0\.attn\.c_attn': 'w8a8'\}\)")
    with pytest.raises(zq.ConfigError, match=msg):
        zq.compile(model_for("gpt2"), (ids(2, 8),), cfg, generation=False)
    from zqcompile.accuracy.fakequant import fake_quantize
    from zqcompile.models import tiny_model
    with pytest.raises(zq.ConfigError, match=msg):  # the eval path says the same (fake_quantize works in place)
        fake_quantize(tiny_model("gpt2"), cfg)
    rows = QuantConfig(default=GemmScheme(WeightQuant(8, num_groups=512)))
    with pytest.raises(zq.ConfigError, match=r"c_attn .*num_groups=512 is more than the 192 output rows; "
                                             r"choose a num_groups that divides N=192 \(e\.g\. 192, 96, 64, 48\)"):
        fake_quantize(tiny_model("gpt2"), rows)  # the same check as compile's, without a capture


def test_plan_names_the_k_group_size_actually_used():
    e = engine_for("gpt2", "w4/8a8")  # INT4 fc1 / fc2: K = 64 and 256; the default group is 128
    plan = {g["fqn"]: g["scheme"] for g in e.record.gemms}
    assert plan["transformer.h.0.mlp.c_fc"] == "W: INT4 K groups of 64, two-level scales | A8 per-token"
    assert plan["transformer.h.0.mlp.c_proj"] == "W: INT4 K groups of 128, two-level scales | A8 per-token"
    assert e.gm.get_buffer("zq_transformer_h_0_mlp_c_fc_w_scale").shape == (256, 1)
    notes = {p["name"]: p["notes"] for p in e.record.passes}["classify_gemms"]
    assert "K groups of 64 for 2 GEMM(s) with K=64 (the default 128 does not fit K)" in notes


def test_override_matching_no_gemm_warns_at_the_compile_call_and_shows_in_the_report():
    cfg = zq.get_config("w8a8").with_overrides({r"h\.0\.mlp\.c_fcc$": "fp16", r"lm_head": "w8a8"})
    with pytest.warns(zq.ConfigWarning) as rec:
        e = zq.compile(model_for("gpt2"), (ids(2, 8),), cfg, generation=False)
    line = (r"override 'h\\.0\\.mlp\\.c_fcc$' matched no GEMM of this model, so it has no effect; "
            r"near matches: 'transformer.h.0.mlp.c_fc', 'transformer.h.1.mlp.c_fc'")
    assert [str(w.message) for w in rec] == [line]
    assert rec[0].filename == __file__  # points at the user's zq.compile line, not inside zqcompile
    assert line in e.report()
    assert {g["fqn"]: g["rule"] for g in e.record.gemms}["lm_head"] == "override 'lm_head'"


def test_nan_weight_names_the_parameter():
    from zqcompile.models import tiny_model
    m = tiny_model("opt")
    m.model.decoder.layers[1].fc1.weight.data[3, 3] = float("inf")
    with pytest.raises(zq.WeightError, match=r"model\.decoder\.layers\.1\.fc1\.weight"):
        zq.compile(m, (ids(2, 8),), "w8a8", generation=False)


@pytest.mark.parametrize("family,param", [
    ("gpt2", "transformer.h.0.mlp.c_fc.weight"),  # Conv1D: canonicalize made a transposed copy
    ("opt", "model.decoder.layers.0.self_attn.k_proj.bias"),  # merged with q/v into one GEMM later
    ("llama", "model.layers.1.mlp.up_proj.weight"),  # merged with gate_proj
])
def test_nan_or_inf_names_the_users_parameter_path(family, param):
    from zqcompile.models import tiny_model
    m = tiny_model(family)
    m.get_parameter(param).data.view(-1)[5] = float("nan") if param.endswith("bias") else float("inf")
    with pytest.raises(zq.WeightError) as err:
        zq.compile(m, (ids(2, 8),), "w8a8", generation=False)
    assert str(err.value) == f"parameter {param!r} has 1 NaN/Inf value(s); fix the checkpoint before quantizing"


def test_example_inputs_of_wrong_type():
    with pytest.raises(zq.InputError, match="must be a torch.Tensor"):
        zq.compile(model_for("bert"), ([[1, 2, 3]],), "w8a8")
    with pytest.raises(zq.InputError, match="torch.nn.Module"):
        zq.compile("bert", (ids(2, 8),), "w8a8")


def test_wrong_dtype_and_shape_at_call_time():
    e = engine_for("bert", "w8a8")
    with pytest.raises(zq.InputError, match="dtype torch.float32"):
        e(torch.zeros(2, 8))
    with pytest.raises(zq.InputError, match="expects 2 dims"):
        e(ids(2, 8)[0])
    with pytest.raises(zq.InputError, match="sequence length 500 outside 1..128"):
        e(ids(1, 500))
    with pytest.raises(zq.InputError, match="unexpected"):
        e(ids(1, 8), token_type_ids=ids(1, 8))


def test_capture_failure_names_the_module():
    class Bad(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.export cannot capture it
                return x
            return -x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Bad()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.inner(self.fc(x))

    with pytest.raises(zq.CaptureError, match=r"module 'inner' \(Bad\)") as err:
        zq.compile(Outer(), (torch.randn(2, 4, 8),), "w8a8")
    line = Bad.forward.__code__.co_firstlineno + 1
    msg = str(err.value)
    assert f"module 'inner' (Bad) at {__file__}:{line} `if x.sum() > 0:" in msg
    assert msg.endswith("-- this is data-dependent Python control flow (an `if`, `int()`, `.item()` or `bool()` on a "
                        "tensor's values): torch.export cannot branch on values; rewrite it with torch.where, or "
                        "torch.cond for two branches.")
    # overrides act on the captured graph: suggesting one could never fix a capture failure
    assert "override" not in msg and "\n" not in msg


def test_capture_failure_other_constructs_say_what_to_change():
    class Reshape(nn.Module):
        def forward(self, x):  # the view only holds for some sizes; export traces batch / seq as symbols
            return x.view(2, -1, 3)

    class ToNumpy(nn.Module):
        def forward(self, x):
            return torch.from_numpy(x.detach().numpy())

    with pytest.raises(zq.CaptureError, match=r"module '<root>' \(Reshape\) at .*`return x\.view\(2, -1, 3\)`.* -- "
                                              r"this is a shape problem: check that the example inputs"):
        zq.compile(Reshape(), (torch.randn(2, 4, 8),), "w8a8")
    with pytest.raises(zq.CaptureError, match=r"module '<root>' \(ToNumpy\) .*RuntimeError: .*numpy.* -- that construct "
                                              r"must be changed so that torch\.export \(non-strict\) can trace it\.$"):
        zq.compile(ToNumpy(), (torch.randn(2, 4, 8),), "w8a8")


@pytest.mark.parametrize("args,kwargs,match", [
    ((ids(0, 8),), {}, r"example input 'input_ids' has shape \(0, 8\), with a zero-size dimension; give at least "
                       r"one batch row and one token"),
    ((ids(2, 0),), {}, r"example input 'input_ids' has shape \(2, 0\), with a zero-size dimension"),
    ((ids(2, 8),), {"attention_mask": torch.ones(2, 5, dtype=torch.long)},
     r"example inputs disagree on \(batch, seq\): \{'positional input 0': \(2, 8\), 'attention_mask': \(2, 5\)\}"),
    ((ids(2, 300),), {}, r"example input 'input_ids' has shape \(2, 300\); batch must be <= 1024 and sequence "
                         r"length <= 128 \(the model's context length\)"),
])
def test_example_input_shapes_are_checked_before_capture(args, kwargs, match):
    with pytest.raises(zq.InputError, match=match):
        zq.compile(model_for("gpt2"), args, "w8a8", example_kwargs=kwargs)


def test_save_to_unwritable_path_leaves_nothing(tmp_path):
    e = engine_for("bert", "w8a8")
    with pytest.raises(OSError, match="does not exist"):
        e.save(tmp_path / "missing" / "m.zq")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # running as root: permissions do not apply
            pytest.skip("running as root: cannot make a directory unwritable")
        with pytest.raises(OSError, match="not writable"):
            e.save(ro / "m.zq")
        assert os.listdir(ro) == []
    finally:
        os.chmod(ro, 0o700)


def test_save_failure_midway_leaves_no_partial_file(tmp_path, monkeypatch):
    e = engine_for("bert", "w8a8")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.export, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        e.save(tmp_path / "m.zq")
    assert os.listdir(tmp_path) == []


def test_load_corrupt_or_foreign_file(tmp_path):
    junk = tmp_path / "junk.zq"
    junk.write_bytes(b"not an engine at all")
    with pytest.raises(zq.EngineFileError, match="not a readable zqcompile engine"):
        zq.load(junk)
    foreign = tmp_path / "foreign.zq"
    ep = torch.export.export(nn.Linear(2, 2), (torch.randn(1, 2),))
    with open(foreign, "wb") as f:
        torch.export.save(ep, f)
    with pytest.raises(zq.EngineFileError, match="not a zqcompile engine"):
        zq.load(foreign)
    good = tmp_path / "good.zq"
    engine_for("bert", "w8a8").save(good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.zq"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(zq.EngineFileError):
        zq.load(truncated)
    with pytest.raises(FileNotFoundError):
        zq.load(tmp_path / "nope.zq")
