"""The quantization formulas against hand computations."""
import pytest
import torch

from zqcompile.ops import quant_math as qm


def test_per_token_scale_and_rounding_match_the_formula(rng):
    x = torch.randn(4, 7, 33, generator=rng)
    x[1, 2] *= 50.0  # an outlier token
    q, s = qm.quantize_per_token(x)
    amax = x.abs().amax(-1, keepdim=True)
    assert torch.allclose(s, amax / 127)
    expect = torch.round(x * (127 / amax)).clamp(-127, 127)
    assert torch.equal(q.float(), expect)
    assert q.abs().max() == 127
    # each token keeps its own resolution: the outlier does not coarsen its neighbours
    err = (q.float() * s - x).abs()
    assert err[1, 3].max() <= s[1, 3].item() / 2 + 1e-7
    assert err.max() <= s.max().item() / 2 + 1e-6


def test_zero_token_quantizes_to_zero_without_nan():
    q, s = qm.quantize_per_token(torch.zeros(2, 8))
    assert torch.equal(q, torch.zeros(2, 8, dtype=torch.int8))
    assert torch.isfinite(s).all() and (s > 0).all()


def test_per_tensor_static_clamps_outliers():
    x = torch.tensor([[0.5, -1.0, 3.0]])
    q, s = qm.quantize_per_tensor(x, torch.tensor(1.0 / 127))
    assert q.tolist() == [[64, -127, 127]]  # 0.5*127=63.5 rounds half-to-even to 64; 3.0 clamps
    assert s.shape == (1, 1) and float(s) == pytest.approx(1 / 127)


def test_int4_pack_roundtrip_and_nibble_order():
    q = torch.randint(-7, 8, (5, 12), dtype=torch.int8)
    p = qm.pack_int4(q)
    assert p.shape == (5, 6) and p.dtype == torch.uint8
    assert torch.equal(qm.unpack_int4(p), q)
    one = qm.pack_int4(torch.tensor([[1, -2]], dtype=torch.int8))
    assert int(one[0, 0]) == (1 | (0xE << 4))  # even k in the low nibble, two's complement


@pytest.mark.parametrize("bits,gran,kw,bound", [
    (8, "row_groups", {}, 1 / 254), (8, "row_groups", {"num_groups": 4}, 1 / 254),
    (8, "tensor", {}, 1 / 254), (4, "k_groups", {"group_size": 16}, 1 / 14), (4, "row_groups", {}, 1 / 14)])
def test_weight_quant_error_is_half_a_step(rng, bits, gran, kw, bound):
    w = torch.randn(32, 64, generator=rng)
    wq, ws = qm.quantize_weight(w, bits, gran, **kw)
    gk = qm.weight_group_k((32, 64), gran, kw.get("group_size"))
    assert ws.shape == (32, 64 // gk) and ws.dtype == torch.float32
    deq = qm.dequantize_weight(wq, ws, bits, torch.float32)
    step = ws.repeat_interleave(gk, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    # group scale = group amax / qmax
    if gran == "row_groups" and "num_groups" in kw:
        assert torch.allclose(ws[:8], w[:8].abs().max() / 127 * torch.ones(8, 1))
    assert float((deq - w).abs().max() / w.abs().max()) <= bound + 1e-6


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        qm.quantize_weight(torch.randn(8, 48), 4, "k_groups", group_size=32)
    with pytest.raises(ValueError, match="does not divide"):
        qm.quantize_weight(torch.randn(6, 8), 8, "row_groups", num_groups=4)


def test_groups_that_do_not_fit_are_refused_not_clamped():
    with pytest.raises(ValueError, match=r"group_size=128 is larger than K=64"):
        qm.quantize_weight(torch.randn(8, 64), 4, "k_groups", group_size=128)
    with pytest.raises(ValueError, match=r"num_groups=16 is more than the 8 output rows"):
        qm.quantize_weight(torch.randn(8, 64), 8, "row_groups", num_groups=16)
    with pytest.raises(ValueError, match=r"INT4 packs two values per byte along K, so K must be even, got K=63"):
        qm.check_weight_groups((8, 63), 4, "row_groups")
    # the size a weight really gets: explicit as given, the default 128 halved until it divides K
    assert qm.check_weight_groups((8, 64), 4, "k_groups", group_size=64) == 64
    assert [qm.check_weight_groups((8, k), 4, "k_groups") for k in (1024, 576, 64, 48)] == [128, 64, 64, 16]
    assert qm.quantize_weight(torch.randn(8, 576), 4, "k_groups")[1].shape == (8, 9)


def test_int_gemm_is_exact_integer_accumulation(rng):
    xq = torch.randint(-127, 128, (5, 3072), dtype=torch.int8, generator=rng)
    wq = torch.randint(-127, 128, (7, 3072), dtype=torch.int8, generator=rng)
    acc = qm.int_gemm_scaled(xq, wq, torch.ones(7, 1), 8)
    exact = (xq.to(torch.int64) @ wq.to(torch.int64).t())
    assert torch.equal(acc.double(), exact.double())


def test_k_group_gemm_applies_each_group_scale(rng):
    xq = torch.randint(-127, 128, (3, 32), dtype=torch.int8, generator=rng)
    wq = torch.randint(-7, 8, (4, 32), dtype=torch.int8, generator=rng)
    ws = torch.rand(4, 2, generator=rng) + 0.5
    got = qm.int_gemm_scaled(xq, qm.pack_int4(wq), ws, 4)
    want = sum((xq[:, g * 16:(g + 1) * 16].double() @ wq[:, g * 16:(g + 1) * 16].double().t()) * ws[:, g].double()
               for g in range(2))
    assert torch.allclose(got.double(), want, rtol=1e-6)
