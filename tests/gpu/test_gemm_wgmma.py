"""The Hopper K-group GEMM kernel (zq_gemm_wgmma, gemm_wgmma.cu) against the mma kernel (the same bits: the same
int32 sums, the same fold and epilogue order) and the reference op, element by element: M around its 64- and
128-token tile edges, K of one to many stages, INT8 and INT4 weights, K groups of 128 / 256 (the conversion above
2^22) and row scales, fp16 and bf16, every epilogue variant, outlier tokens / weight rows (test_kernels.make_gemm),
both configurations (128 tokens a block; 64 tokens, two blocks an SM), into NaN-poisoned outputs with a guard row.
Then its contract (what it declines returns cudaErrorNotSupported with nothing written), the dispatcher
(zq_gemm_run, kernel id 5) and the chooser with it enabled."""
from __future__ import annotations

import pytest
import torch

from . import require_cuda

pytestmark = pytest.mark.gpu
require_cuda()

from zqcompile.plugins import cuda, cuda_gemm  # noqa: E402
from zqcompile.plugins import gemm_kernels as G  # noqa: E402

from .test_kernels import ACTS, DEV, assert_gemm_exact, make_gemm, ref  # noqa: E402

if torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("the wgmma kernel is sm_90a code", allow_module_level=True)

CONFIGS = range(cuda._lib.zq_gemm_wgmma_num_configs())


def run(path, xq, xs, wq, ws, bias, res, act, bits, out_dtype, cfg):
    m, n = xq.shape[0], wq.shape[0]
    buf = torch.full((m + 1, n), float("nan"), dtype=out_dtype, device=DEV)
    rc = cuda_gemm.launch_gemm(path, xq, xs.reshape(m), wq, ws, bias, res, act, bits, buf[:m], config=cfg)
    torch.cuda.synchronize()
    return rc, buf


def check(m, k, n, bits, group_size, out_dtype, act, with_bias, with_res, seed):
    xq, xs, wq, ws, bias, res = make_gemm(m, k, n, bits, group_size, out_dtype, seed=seed, with_bias=with_bias,
                                          with_res=with_res)
    y_ref = ref("int8_gemm_dequant")(xq, xs, wq, ws, bias, res, act, bits, out_dtype)
    rc, mma = run("mma", xq, xs, wq, ws, bias, res, act, bits, out_dtype, 0)
    assert rc == 0
    for cfg in CONFIGS:
        rc, buf = run("wgmma", xq, xs, wq, ws, bias, res, act, bits, out_dtype, cfg)
        assert rc == 0, f"config {cfg}: cudaError {rc}"
        assert_gemm_exact(buf[:m], y_ref)
        assert torch.isnan(buf[m]).all(), f"config {cfg} wrote past row M"
        assert torch.equal(buf[:m], mma[:m]), f"config {cfg}: not the mma kernel's bits"


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (8, 128), (4, 256), (4, None), (8, None)])
@pytest.mark.parametrize("m", [1, 65, 77, 128, 129, 300, 1024])
def test_against_mma_and_reference(m, bits, group_size, out_dtype):
    act = ACTS[m % len(ACTS)]
    check(m, 1024, 384, bits, group_size, out_dtype, act, with_bias=m % 2 == 1, with_res=m % 3 != 2, seed=m + bits)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("with_bias,with_res", [(False, False), (True, True)])
def test_epilogues(act, with_bias, with_res):
    check(257, 512, 256, 4, 128, torch.float16, act, with_bias, with_res, seed=3)


@pytest.mark.parametrize("m,k,n", [(2048, 4096, 1024), (520, 128, 128), (4096, 768, 3072), (1000, 14336, 256)])
def test_model_shapes(m, k, n):
    """Long K (many groups), one stage, the BERT fc1 shape, a K of 14336 (112 groups)."""
    check(m, k, n, 4, 128, torch.float16, "gelu" if k == 768 else "none", True, m % 2 == 0, seed=k + n)


@pytest.mark.parametrize("m,k,n,bits,group_size,why", [
    (64, 1024, 320, 4, 128, "N % 128"), (64, 1088, 256, 4, None, "K % 128"), (64, 1024, 256, 4, 64, "group 64"),
    (64, 1024, 256, 8, 32, "group 32")])
def test_declines(m, k, n, bits, group_size, why):
    xq, xs, wq, ws, bias, res = make_gemm(m, k, n, bits, group_size, torch.float16, seed=1)
    for cfg in CONFIGS:
        rc, buf = run("wgmma", xq, xs, wq, ws, bias, res, "none", bits, torch.float16, cfg)
        assert rc == cuda_gemm.CUDA_ERROR_NOT_SUPPORTED, why
        assert torch.isnan(buf).all(), "declined, yet wrote"


def test_misaligned_x_declines():
    xq, xs, wq, ws, bias, res = make_gemm(65, 1024, 256, 4, None, torch.float16, seed=2)
    x = torch.empty(65 * 1024 + 8, dtype=torch.int8, device=DEV)[8:].view(65, 1024)  # 8 bytes in: misaligned
    x.copy_(xq)
    rc, buf = run("wgmma", x, xs, wq, ws, bias, res, "none", 4, torch.float16, 0)
    assert rc == cuda_gemm.CUDA_ERROR_NOT_SUPPORTED and torch.isnan(buf).all()


def test_dispatcher_and_chooser():
    """zq_gemm_run with kernel id 5, then the op through the chooser with the kernel enabled: it is chosen for
    K groups at large M, serves the call, and its output equals the mma kernel's."""
    assert cuda._lib.zq_gemm_kernel_available(5) == 1 and cuda._lib.zq_gemm_kernel_name(5) == b"wgmma"
    m, k, n = 2049, 2048, 512
    xq, xs, wq, ws, bias, res = make_gemm(m, k, n, 4, 128, torch.float16, seed=5, with_res=True)
    rc, buf = run("wgmma", xq, xs, wq, ws, bias, res, "silu", 4, torch.float16, -1)
    assert rc == 0
    _, mma = run("mma", xq, xs, wq, ws, bias, res, "silu", 4, torch.float16, 0)
    assert torch.equal(buf[:m], mma[:m])
    with G.wgmma_mode("auto"):
        c = G.choose_gemm(G.problem_of("int8_gemm_dequant", xq, wq, ws, bias, res, 4, torch.float16, m),
                          cuda_gemm.device_of(torch.cuda.current_device()))
        assert c.kernel.name == "wgmma" and c.fallback is not None
        with cuda_gemm.served_by() as s:
            y = torch.ops.zq.int8_gemm_dequant(xq, xs, wq, ws, bias, res, "silu", 4, torch.float16)
            torch.cuda.synchronize()
        assert s == {"wgmma": 1}
    assert torch.equal(y, mma[:m])
