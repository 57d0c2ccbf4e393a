"""The decode GEMM's L2 prefetch of its weight rows before its programmatic-dependent-launch wait
(zq_set_gemm_prefetch, zq/launch.cuh pdl_begin(L2Prefetch); off by default, measured slower) never changes a
result: the same bits with no prefetch, the library's choice, a budget that stops after the first block and every
block, for configurations 0-2 of zq_gemm_skinny; and a weight written by the kernel right ahead of the GEMM on
the stream (a zq quantize_per_token launched with PDL, so the GEMM's blocks issue their prefetch while it writes)
is read as written, replay after replay of a CUDA graph. Runs on a CUDA machine with the library built; skips elsewhere."""
from __future__ import annotations

import pytest
import torch

from . import require_cuda

pytestmark = pytest.mark.gpu
require_cuda()

from zqcompile.ops import quant_math as qm  # noqa: E402
from zqcompile.plugins import cuda  # noqa: E402
from zqcompile.plugins import cuda_gemm  # noqa: E402

from .test_kernels import DEV, assert_gemm_exact, make_gemm, poison, ref  # noqa: E402

EVERY_BLOCK = 1 << 40


def prefetch(nbytes: int):
    return cuda.switched("gemm_prefetch", nbytes)


def skinny(xq, xs, wq, ws, bias, res, act, bits, cfg):
    out = torch.full((xq.shape[0], wq.shape[0]), float("nan"), dtype=torch.float16, device=DEV)
    cuda_gemm.run_gemm("skinny", xq, xs.reshape(-1), wq, ws, bias, res, act, bits, out, config=0)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("cfg", [0, 1, 2])
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 128)])
@pytest.mark.parametrize("m", [1, 16, 33])
def test_prefetch_never_changes_the_result(cfg, bits, group_size, m):
    if cfg == 1 and m > 32:
        pytest.skip("configuration 1 stops at M = 32")
    k, n = 2048, 4096
    xq, xs, wq, ws, bias, res = make_gemm(m, k, n, bits, group_size, torch.float16, seed=m + bits + cfg,
                                          with_res=True)
    block_rows = 32 if cfg == 1 else 16
    outs = {}
    for budget in (0, -1, block_rows * k * bits // 8, EVERY_BLOCK):
        with prefetch(budget):
            poison()
            outs[budget] = skinny(xq, xs, wq, ws, bias, res, "silu", bits, cfg)
    assert_gemm_exact(outs[0], ref("int8_gemm_dequant")(xq, xs, wq, ws, bias, res, "silu", bits, torch.float16))
    for budget, out in outs.items():
        assert torch.equal(out, outs[0]), f"budget {budget}: a different result"


def test_a_weight_written_by_the_kernel_ahead_is_read_as_written():
    """quantize_per_token (a zq kernel, PDL) writes the weight and its row scales into fixed buffers; the skinny
    GEMM right behind it prefetches those rows before its wait. Captured once, replayed on new weights: each
    result equals the reference on the weight as written."""
    m, k, n = 4, 4096, 4096
    x = torch.randn(m, k, device=DEV)
    xq, xs = qm.quantize_per_token(x)
    xs = xs.reshape(m).contiguous()
    w_src = torch.empty(n, k, dtype=torch.float16, device=DEV)
    wq = torch.empty(n, k, dtype=torch.int8, device=DEV)
    w_scale = torch.empty(n, 1, dtype=torch.float32, device=DEV)
    out = torch.empty(m, n, dtype=torch.float16, device=DEV)
    lib = cuda._lib

    def step():
        stream = cuda._stream(w_src)
        cuda._check(lib.zq_quantize_per_token(w_src.data_ptr(), cuda.DTYPES[torch.float16], n, k, wq.data_ptr(),
                                              w_scale.data_ptr(), stream), "quantize_per_token")
        cuda_gemm.run_gemm("skinny", xq, xs, wq, w_scale, None, None, "none", 8, out, config=0)

    with prefetch(EVERY_BLOCK):
        w_src.copy_(torch.randn(n, k, device=DEV) * 0.05)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        for i in range(6):
            w_src.copy_(torch.randn(n, k, device=DEV) * (0.05 + 0.1 * i))
            out.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            expect = ref("int8_gemm_dequant")(xq, xs.reshape(m, 1), wq, w_scale, None, None, "none", 8,
                                              torch.float16)
            assert_gemm_exact(out, expect)
            q_ref, s_ref = qm.quantize_per_token(w_src.float())
            assert torch.equal(wq, q_ref) or (wq.int() - q_ref.int()).abs().max() <= 1  # the weight as written

