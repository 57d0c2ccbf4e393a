"""The two-level INT4 path (WeightQuant(group_scales="two-level")): zq_unpack_int4_two_level against the reference
unpack (int8 code x u and the row base, bit for bit, into poisoned memory), the GEMM op with two_level=True (the
CUTLASS INT8 kernel on the unpacked weight: sm90_two_level) against the reference op element by element (outlier
tokens and weight rows, odd M, every epilogue), the unpack's contract, and a tiny W4/8A8 engine whose prefill takes
the path and gives what the fp32-scale kernels give on the same constants."""
from __future__ import annotations

import ctypes

import pytest
import torch

from . import require_cuda

pytestmark = pytest.mark.gpu
require_cuda()

from zqcompile.ops import quant_math as qm  # noqa: E402
from zqcompile.plugins import cuda, cuda_gemm  # noqa: E402
from zqcompile.plugins import gemm_kernels as G  # noqa: E402

from .test_kernels import ACTS, DEV, assert_gemm_exact, poison, rand_act, ref  # noqa: E402

if not cuda_gemm.sm90_usable():
    pytest.skip("the two-level path runs the Hopper INT8 GEMM (sm_90 and the CUTLASS kernels)", allow_module_level=True)


def two_level_weight(n, k, group, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = torch.randn((n, k), generator=g, device=DEV) * 0.05
    w[n // 3] *= 20  # an outlier row
    w[:, : group] *= 0.02  # a quiet first group: small u
    return qm.quantize_weight(w, 4, "k_groups", group_size=group, two_level=True)


@pytest.mark.parametrize("n,k,group", [(384, 1024, 128), (130, 4096, 128), (8, 256, 32), (24, 512, 16),
                                       (14336, 4096, 128)])
def test_unpack_is_code_times_u_and_the_row_base(n, k, group):
    wq, ws = two_level_weight(n, k, group, seed=n + k)
    base = qm.two_level_base(ws)
    u = (ws / base).round().to(torch.int32)
    want = (qm.unpack_int4(wq).to(torch.int32) * u.repeat_interleave(group, dim=1)).to(torch.int8)
    poison()
    w8, b = cuda_gemm.unpack_int4_two_level(wq, ws)
    torch.cuda.synchronize()
    assert torch.equal(b, base) and torch.equal(w8, want)
    assert int(w8.abs().max()) <= 7 * qm.TWO_LEVEL_MAX


def test_the_scale_format_is_recognized_on_the_gpu():  # a division by a Python number is not exact on CUDA
    wq, ws = two_level_weight(512, 1024, 128, seed=6)
    assert qm.is_two_level(ws) and torch.equal(qm.two_level_base(ws).cpu(), qm.two_level_base(ws.cpu()))
    assert torch.equal(qm.two_level_scales(ws).cpu(), qm.two_level_scales(ws.cpu()))


def test_unpack_contract():
    wq, ws = two_level_weight(16, 264, 24, seed=1)  # K and its groups not multiples of 16
    out, base = torch.empty(16, 264, dtype=torch.int8, device=DEV), torch.empty(16, device=DEV)
    rc = cuda._lib.zq_unpack_int4_two_level(wq.data_ptr(), ws.data_ptr(), ws.shape[1], 16, 264, out.data_ptr(),
                                            base.data_ptr(), ctypes.c_void_p(0))
    assert rc == 1  # cudaErrorInvalidValue, nothing launched
    wq, ws = two_level_weight(16, 256, 128, seed=2)
    out = torch.empty(16 * 256 + 16, dtype=torch.int8, device=DEV)
    rc = cuda._lib.zq_unpack_int4_two_level(wq.data_ptr(), ws.data_ptr(), 2, 16, 256, out.data_ptr() + 8,
                                            base.data_ptr(), ctypes.c_void_p(0))
    assert rc == cuda_gemm.CUDA_ERROR_NOT_SUPPORTED  # a misaligned output


def gemm_case(m, k, n, group, out_dtype, with_bias, with_res, seed):
    x = rand_act((m, k), torch.float32, seed)
    xq, xs = qm.quantize_per_token(x)
    wq, ws = two_level_weight(n, k, group, seed + 1)
    bias = (0.1 * torch.randn(n, device=DEV)).to(out_dtype) if with_bias else None
    res = torch.randn((m, n), device=DEV).to(out_dtype) if with_res else None
    return xq, xs, wq, ws, bias, res


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", [(65, 1024, 384), (129, 768, 3072), (128, 4096, 1024), (300, 14336, 256),
                                   (2048, 4096, 2048)])
def test_gemm_op_runs_the_int8_kernel_and_matches_the_reference(m, k, n, out_dtype):
    act = ACTS[m % len(ACTS)]
    xq, xs, wq, ws, bias, res = gemm_case(m, k, n, 128, out_dtype, m % 2 == 1, m % 3 != 2, seed=m + k)
    y_ref = ref("int8_gemm_dequant")(xq, xs, wq, ws, bias, res, act, 4, out_dtype)
    poison()
    with cuda_gemm.served_by() as served:
        y = torch.ops.zq.int8_gemm_dequant(xq, xs, wq, ws, bias, res, act, 4, out_dtype, True)
        torch.cuda.synchronize()
    assert dict(served) == {"sm90_two_level": 1}
    assert_gemm_exact(y, y_ref)
    with cuda_gemm.served_by() as served:  # the same call without the flag: the K-group kernel, the same values
        y_kg = torch.ops.zq.int8_gemm_dequant(xq, xs, wq, ws, bias, res, act, 4, out_dtype)
    assert "sm90_two_level" not in served
    assert_gemm_exact(y_kg, y_ref)


@pytest.mark.parametrize("act", ACTS)
def test_epilogues(act):
    xq, xs, wq, ws, bias, res = gemm_case(257, 512, 256, 128, torch.float16, True, True, seed=3)
    y_ref = ref("int8_gemm_dequant")(xq, xs, wq, ws, bias, res, act, 4, torch.float16)
    assert_gemm_exact(torch.ops.zq.int8_gemm_dequant(xq, xs, wq, ws, bias, res, act, 4, torch.float16, True), y_ref)


@pytest.mark.parametrize("m,k,n", [(16, 1024, 384), (77, 768, 3072)])  # decode-sized; N > K up to M = 128
def test_small_calls_keep_the_fp32_scale_kernels(m, k, n):
    xq, xs, wq, ws, bias, res = gemm_case(m, k, n, 128, torch.float16, False, False, seed=4)
    with cuda_gemm.served_by() as served:
        y = torch.ops.zq.int8_gemm_dequant(xq, xs, wq, ws, None, None, "none", 4, torch.float16, True)
    assert "sm90_two_level" not in served
    assert_gemm_exact(y, ref("int8_gemm_dequant")(xq, xs, wq, ws, None, None, "none", 4, torch.float16))


def test_engine_prefill_takes_the_path():
    import zqcompile as zq
    from zqcompile.config import ActQuant, GemmScheme, QuantConfig, WeightQuant
    from tests._tiny import tiny_llama
    model = tiny_llama().eval()
    ids = torch.randint(0, 128, (3, 64), generator=torch.Generator().manual_seed(5))  # M = 192: past 128 (N > K)
    w4 = GemmScheme(WeightQuant(4, "k_groups", group_size=32, group_scales="two-level"), ActQuant("token"))
    cfg = QuantConfig("w4-2l", GemmScheme(WeightQuant(8), ActQuant("token")), {"fc1": w4, "fc2": w4})
    engine = zq.compile(model.to(DEV).half(), (ids.to(DEV),), cfg, generation=False)
    engine.cuda_graphs = False  # count the kernels of each call, not of a graph's capture
    with torch.no_grad(), cuda_gemm.served_by() as served:
        y = engine(ids.to(DEV))
    assert served["sm90_two_level"] == 4, dict(served)  # fc1 and fc2 of both layers
    with torch.no_grad(), G.two_level_mode("0"), cuda_gemm.served_by() as served:
        y_kg = engine(ids.to(DEV))
    assert "sm90_two_level" not in served
    y, y_kg = (t.logits if hasattr(t, "logits") else t for t in (y, y_kg))
    assert (y.float() - y_kg.float()).abs().max() <= 2e-2 * y_kg.float().abs().max()
