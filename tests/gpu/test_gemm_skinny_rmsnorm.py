"""The decode GEMM with RMSNorm and the per-token quantization in its prologue (zq_gemm_skinny_rmsnorm,
gemm_skinny.cu `nq`) against the two kernels it replaces, bit for bit: zq_norm_quant (the residual sum, the INT8
codes and scales that block 0 writes) and then zq_gemm_skinny on those codes (the GEMM's output), and against the
fp32 reference GEMM; M = 1..8, K = 2048..8192 (norm_quant's 128- and 256-thread block rows), INT8 rows and INT4 K
groups, fp16 and bf16, with and without the residual and the GEMM's bias / activation / residual, outlier channels,
NaN-poisoned outputs; then what it declines. Runs on a CUDA machine with the library built; skips elsewhere."""
from __future__ import annotations

import pytest
import torch

from . import require_cuda

pytestmark = pytest.mark.gpu
require_cuda()

from zqcompile.ops import quant_math as qm  # noqa: E402
from zqcompile.plugins import cuda  # noqa: E402
from zqcompile.plugins import cuda_gemm  # noqa: E402

from .test_kernels import DEV, assert_gemm_exact, poison, ref  # noqa: E402

NOT_SUPPORTED = cuda_gemm.CUDA_ERROR_NOT_SUPPORTED


def norm_inputs(m, k, dtype, seed, with_residual):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=DEV)
    x[:, 7] *= 30.0  # an outlier channel, as LLaMA's residual stream has
    res = torch.randn(m, k, generator=g, device=DEV).to(dtype) if with_residual else None
    gamma = (1 + 0.2 * torch.randn(k, generator=g, device=DEV)).to(dtype)
    return x.to(dtype), res, gamma


def norm_quant(x, res, gamma, eps):
    """zq_norm_quant's kernel (RMSNorm): codes, scales, residual sum."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=DEV)
    s = torch.empty(m, dtype=torch.float32, device=DEV)
    hsum = torch.empty_like(x) if res is not None else None
    cuda._check(cuda._lib.zq_norm_quant(x.data_ptr(), cuda._ptr(res), gamma.data_ptr(), None, cuda.DTYPES[x.dtype],
                                        m, k, float(eps), 1, q.data_ptr(), s.data_ptr(), None, cuda._ptr(hsum),
                                        cuda._stream(x)), "norm_quant")
    return q, s, hsum


def weights(n, k, bits, group, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=DEV) * 0.05
    w[n // 3] *= 20
    return qm.quantize_weight(w, bits, "k_groups" if group else "row_groups", group_size=group)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("k", [2048, 4096, 6144, 8192])
@pytest.mark.parametrize("bits,group", [(8, None), (4, 128)])
def test_one_kernel_equals_norm_quant_then_the_gemm(dtype, m, k, bits, group):
    n = 6144 if k == 4096 else 4096  # 32 weight rows a block at N = 6144 on 132 SMs, else 16
    seed = m * 100 + k + bits
    with_res = (m + k // 1024) % 2 == 0
    x, res, gamma = norm_inputs(m, k, dtype, seed, with_res)
    wq, ws = weights(n, k, bits, group, seed + 1)
    gemm_bias = (0.1 * torch.randn(n, device=DEV)).to(dtype) if m % 2 else None
    gemm_res = torch.randn(m, n, device=DEV).to(dtype) if m % 3 == 0 else None
    act = ["none", "silu", "gelu"][m % 3]
    q_ref, s_ref, h_ref = norm_quant(x, res, gamma, 1e-5)
    expect = torch.empty(m, n, dtype=dtype, device=DEV)
    cuda_gemm.run_gemm("skinny", q_ref, s_ref, wq, ws, gemm_bias, gemm_res, act, bits, expect, config=0)
    poison()
    out = torch.full((m + 1, n), float("nan"), dtype=dtype, device=DEV)
    q = torch.full((m, k), 99, dtype=torch.int8, device=DEV)
    s = torch.full((m,), float("nan"), device=DEV)
    hsum = torch.full_like(x, float("nan")) if with_res else None
    rc = cuda_gemm.launch_gemm_rmsnorm(x, res, gamma, 1e-5, wq, ws, gemm_bias, gemm_res, act, bits, out[:m],
                                       hsum=hsum, q=q, scale=s)
    torch.cuda.synchronize()
    assert rc == 0, f"cudaError {rc}"
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref), "the prologue's codes are not norm_quant's"
    if with_res:
        assert torch.equal(hsum, h_ref)
    assert torch.equal(out[:m], expect), "not the GEMM of norm_quant's codes"
    assert torch.isnan(out[m]).all(), "wrote past row M"
    assert_gemm_exact(out[:m], ref("int8_gemm_dequant")(q_ref, s_ref.reshape(m, 1), wq, ws, gemm_bias, gemm_res,
                                                         act, bits, dtype))


def test_without_the_codes_out_and_in_a_cuda_graph():
    """q / scale / hsum left out (the engine's case: the GEMM the only reader); replayed in a graph on new rows."""
    m, k, n = 1, 4096, 4096
    x, res, gamma = norm_inputs(m, k, torch.float16, 3, True)
    wq, ws = weights(n, k, 8, None, 4)
    out = torch.empty(m, n, dtype=torch.float16, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        assert cuda_gemm.launch_gemm_rmsnorm(x, res, gamma, 1e-6, wq, ws, None, None, "none", 8, out) == 0
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        cuda_gemm.launch_gemm_rmsnorm(x, res, gamma, 1e-6, wq, ws, None, None, "none", 8, out)
    for i in range(3):
        x.copy_(torch.randn(m, k, device=DEV) * (1 + i))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        q_ref, s_ref, _ = norm_quant(x, res, gamma, 1e-6)
        expect = torch.empty_like(out)
        cuda_gemm.run_gemm("skinny", q_ref, s_ref, wq, ws, None, None, "none", 8, expect, config=0)
        assert torch.equal(out, expect)


@pytest.mark.parametrize("case", ["m9", "k1024_warp_rows", "k16384_512_threads", "out_bf16_x_fp16", "q_no_scale",
                                  "fp8_weights"])
def test_declines_outside_its_contract(case):
    m = 9 if case == "m9" else 2
    k = {"k1024_warp_rows": 1024, "k16384_512_threads": 16384}.get(case, 4096)
    x, res, gamma = norm_inputs(m, k, torch.float16, 5, True)
    wq, ws = weights(256, k, 8, None, 6)
    out = torch.full((m, 256), float("nan"), dtype=torch.bfloat16 if case == "out_bf16_x_fp16" else torch.float16,
                     device=DEV)
    q = torch.empty(m, k, dtype=torch.int8, device=DEV) if case == "q_no_scale" else None
    if case == "fp8_weights":
        wq = wq.float().clamp(-127, 127).to(torch.float8_e4m3fn)
    rc = cuda_gemm.launch_gemm_rmsnorm(x, res, gamma, 1e-5, wq, ws, None, None, "none", 8, out, q=q)
    torch.cuda.synchronize()
    assert rc == NOT_SUPPORTED and torch.isnan(out.float()).all()
