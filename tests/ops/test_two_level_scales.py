"""WeightQuant(group_scales='two-level'): INT4 K-group scales rounded up to integer multiples (1..15) of a row base,
exactly (qm.two_level_scales / is_two_level); no code clipped; the config refuses other weights in one line; a
W4/8A8 engine built with it holds the two-level scales of the model's weights and is as close to the model as
with fp32 group scales."""
from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

import zqcompile as zq
from zqcompile.config import ConfigError, GemmScheme, ActQuant, QuantConfig, WeightQuant
from zqcompile.ops import quant_math as qm


def test_scales_are_exact_integer_multiples_of_a_row_base():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 512, generator=g) * torch.rand(64, 1, generator=g) * 3
    w[:, 128:256] *= 0.01  # a quiet group: its u is small
    fp = qm.weight_scales(w, 4, "k_groups", group_size=128)
    s = qm.weight_scales(w, 4, "k_groups", group_size=128, two_level=True)
    assert s.shape == fp.shape and bool((s >= fp).all())  # only grows: nothing is clipped
    base = s.amax(dim=1, keepdim=True) / qm.TWO_LEVEL_MAX
    u = s / base
    assert torch.equal(u, torch.round(u)) and int(u.min()) >= 1 and int(u.max()) == qm.TWO_LEVEL_MAX
    assert qm.is_two_level(s) and not qm.is_two_level(fp)
    q, s2 = qm.quantize_weight(w, 4, "k_groups", group_size=128, two_level=True)
    assert torch.equal(s2, s)
    codes = qm.weight_int8(q, 4).to(torch.int32) * u.to(torch.int32).repeat_interleave(128, dim=1)
    assert int(codes.abs().max()) <= 7 * qm.TWO_LEVEL_MAX  # code x u is an int8


def test_k_sharded_scales_are_the_full_weights_slice():
    w = torch.randn(32, 1024, generator=torch.Generator().manual_seed(1))
    _, full = qm.quantize_weight(w, 4, "k_groups", group_size=128, two_level=True)
    q, s = qm.quantize_weight_shard(w, w[:, 512:], 1, 512, 4, "k_groups", None, 128, True)
    assert torch.equal(s, full[:, 4:])


def test_config_refuses_it_outside_int4_k_groups():
    with pytest.raises(ConfigError, match="needs bits=4 and granularity='k_groups'"):
        WeightQuant(8, group_scales="two-level")
    with pytest.raises(ConfigError, match="group_scales"):
        WeightQuant(4, "k_groups", group_scales="int")
    assert "two-level scales" in WeightQuant(4, "k_groups", group_scales="two-level").describe()


def test_engine_with_two_level_scales_matches_the_reference():
    from tests._tiny import tiny_llama
    model = tiny_llama().eval()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    w4 = GemmScheme(WeightQuant(4, "k_groups", group_size=32, group_scales="two-level"), ActQuant("token"))
    cfg = QuantConfig("w4-two-level", GemmScheme(WeightQuant(8), ActQuant("token")), {"fc1": w4, "fc2": w4})
    engine = zq.compile(model, (ids,), cfg, generation=False)
    gemms = [n for n in engine.gm.graph.nodes if n.target == torch.ops.zq.int8_gemm_dequant.default and n.args[7] == 4]
    scales = [functools.reduce(getattr, n.args[3].target.split("."), engine.gm) for n in gemms]
    assert len(scales) == 4 and all(qm.is_two_level(t) for t in scales)  # fc1 (gate+up) and fc2 of both layers
    downs = [qm.weight_scales(layer.mlp.down_proj.weight.detach(), 4, "k_groups", group_size=32, two_level=True)
             for layer in model.model.layers]
    assert all(any(torch.equal(d, s) for s in scales) for d in downs)  # the model's own weights' two-level scales
    fp = zq.compile(model, (ids,), replace_two_level(cfg), generation=False)
    with torch.no_grad():
        y, y_fp, ref = engine(ids), fp(ids), model(ids).logits
    y, y_fp = (t.logits if hasattr(t, "logits") else t for t in (y, y_fp))
    err, err_fp = (float((a - ref).norm() / ref.norm()) for a in (y, y_fp))
    assert err < 0.5 and abs(err - err_fp) < 0.1, (err, err_fp)


_LOAD = """
import sys, torch
import zqcompile as zq
e = zq.load(sys.argv[1])
out = e(torch.load(sys.argv[1] + ".in.pt"))
flags = [bool(n.args[9]) if len(n.args) > 9 else False for n in e.gm.graph.nodes
         if n.target == torch.ops.zq.int8_gemm_dequant.default and n.args[7] == 4]
torch.save({"out": out.logits if hasattr(out, "logits") else out, "flags": flags}, sys.argv[1] + ".out.pt")
"""


def test_the_gemm_op_is_told_and_the_flag_survives_save_and_load(tmp_path):
    """The INT4 GEMMs carry two_level=True (so an H200 plan takes the INT8 route past M = 64, 128 where N > K), the
    INT8 ones do not; an engine saved here and loaded in a new process keeps the flag and its outputs bit-exact."""
    from tests._tiny import tiny_llama
    from tests.subproc import run_python
    from zqcompile.plugins import gemm_kernels as G
    from zqcompile.plugins.gemm_plan import problem_of_node
    model = tiny_llama().eval()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(3))
    w4 = GemmScheme(WeightQuant(4, "k_groups", group_size=32, group_scales="two-level"), ActQuant("token"))
    engine = zq.compile(model, (ids,), QuantConfig("w4-2l", GemmScheme(WeightQuant(8), ActQuant("token")),
                                                   {"fc1": w4, "fc2": w4}), generation=False)
    gemms = [n for n in engine.gm.graph.nodes if n.target == torch.ops.zq.int8_gemm_dequant.default]
    problems = [problem_of_node(n) for n in gemms]
    assert sorted(p.two_level for p in problems) == [False] * 5 + [True] * 4  # qkv, o, head (INT8) | fc1, fc2
    h200 = G.GemmDevice("H200", (9, 0), library=True, sm90_library=True)
    for p in problems:
        if p.two_level and p.k % 16 == 0 and p.n % 8 == 0:
            half = replace(p, m=256, out_dtype="float16", residual_dtype=p.residual_dtype and "float16")
            assert G.choose_gemm(half, h200).kernel is G.SM90_TWO_LEVEL
    path = tmp_path / "two_level.zq"
    engine.save(path)
    torch.save(ids, str(path) + ".in.pt")
    with torch.no_grad():
        ref = engine(ids)
    ref = ref.logits if hasattr(ref, "logits") else ref
    res = run_python(_LOAD, str(path))
    assert res.returncode == 0, res.stderr
    got = torch.load(str(path) + ".out.pt")
    assert got["flags"] == [True] * 4 and torch.equal(got["out"], ref)


def replace_two_level(cfg):
    return replace(cfg, name="w4-fp32-scales",
                   roles={k: replace(v, weight=replace(v.weight, group_scales="fp32")) for k, v in cfg.roles.items()})
