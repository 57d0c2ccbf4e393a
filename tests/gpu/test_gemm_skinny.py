"""The decode-shaped GEMM kernel (zq_gemm_skinny, gemm_skinny.cu) against the reference op, element by element:
M = 1..64 around its token-tile edges, INT8 and INT4 weights, row scales and K groups of 128 / 256 / 512, fp16 and
bf16, every epilogue variant, outlier tokens / channels / weight rows (tests/gpu/test_kernels.make_gemm), every
configuration (16 / 32 weight rows a block, two token groups, 128 rows with K over a cluster, the sm_90a wgmma
configuration of 64 rows), into NaN-poisoned outputs with a guard row. Then its contract: what it declines returns
cudaErrorNotSupported with nothing written; and through the dispatcher (zq_gemm_run) and the chooser when it is
enabled."""
from __future__ import annotations

import pytest
import torch

from . import require_cuda

pytestmark = pytest.mark.gpu
require_cuda()

from zqcompile.plugins import cuda_gemm  # noqa: E402
from zqcompile.plugins import gemm_kernels as G  # noqa: E402

from .test_kernels import ACTS, DEV, assert_gemm_exact, make_gemm, ref  # noqa: E402

MS = [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 48, 63, 64]


def run_skinny(xq, xs, wq, ws, bias, res, act, bits, out_dtype, cfg):
    m, n = xq.shape[0], wq.shape[0]
    buf = torch.full((m + 1, n), float("nan"), dtype=out_dtype, device=DEV)
    rc = cuda_gemm.launch_gemm("skinny", xq, xs.reshape(m), wq, ws, bias, res, act, bits, buf[:m], config=cfg)
    torch.cuda.synchronize()
    return rc, buf


def cluster_declines(m, k, n):
    """Configuration 3's contract: sm_90, N % 128 == 0, and x's slice at the largest split (8) within 113 KB."""
    mp = 8 * next(t for t in (1, 2, 4, 8) if m <= 8 * t)
    slice_bytes = mp * (-(-(k // 128) // 8) * 128 + 16)
    return n % 128 or torch.cuda.get_device_capability()[0] < 9 or slice_bytes > 113 * 1024


def wgmma_declines(n):
    """Configuration 4's contract: compute capability 9.0 (sm_90a code) and N % 64 == 0."""
    return n % 64 or torch.cuda.get_device_capability() != (9, 0)


def check(m, k, n, bits, group_size, out_dtype, act, with_bias, with_res, seed):
    xq, xs, wq, ws, bias, res = make_gemm(m, k, n, bits, group_size, out_dtype, seed=seed, with_bias=with_bias,
                                          with_res=with_res)
    y_ref = ref("int8_gemm_dequant")(xq, xs, wq, ws, bias, res, act, bits, out_dtype)
    for cfg in (0, 1, 2, 3, 4):
        rc, buf = run_skinny(xq, xs, wq, ws, bias, res, act, bits, out_dtype, cfg)
        if ((cfg == 1 and (n % 32 or m > 32)) or (cfg == 3 and cluster_declines(m, k, n))
                or (cfg == 4 and wgmma_declines(n))):
            assert rc == cuda_gemm.CUDA_ERROR_NOT_SUPPORTED
            assert torch.isnan(buf).all(), "declined, yet wrote"
            continue
        assert rc == 0, f"config {cfg}: cudaError {rc}"
        assert_gemm_exact(buf[:m], y_ref)
        assert torch.isnan(buf[m]).all(), f"config {cfg} wrote past row M"


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 128), (4, None), (8, 128), (4, 256)])
def test_skinny_matches_reference_over_m(m, bits, group_size):
    check(m, 1024, 96, bits, group_size, torch.float16, ACTS[m % 5], with_bias=m % 2 == 0, with_res=m % 3 == 0,
          seed=7 * m + bits)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 128), (4, None), (8, 128), (4, 256)])
def test_skinny_wgmma_over_m(m, bits, group_size):
    """N = 192: three 64-row tiles, so configuration 4 runs too (split over a cluster of 4 at K = 1024)."""
    check(m, 1024, 192, bits, group_size, torch.bfloat16, ACTS[(m + 2) % 5], with_bias=m % 2 == 1,
          with_res=m % 4 == 0, seed=5 * m + bits)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("with_bias,with_res", [(False, False), (True, True), (True, False), (False, True)])
def test_skinny_epilogues(out_dtype, act, with_bias, with_res):
    for m, bits, group_size in [(1, 8, None), (5, 4, 128), (33, 8, None), (64, 4, 128)]:
        check(m, 384, 160, bits, group_size, out_dtype, act, with_bias, with_res, seed=m + 11 * bits)
        check(m, 256, 64, bits, group_size, out_dtype, act, with_bias, with_res, seed=m + 13 * bits)  # cfg 4


@pytest.mark.parametrize("m,k,n,bits,group_size", [
    (1, 128, 16, 8, None), (3, 128, 16, 4, 128),  # one chunk: seven of the eight warps have nothing
    (16, 4096, 6144, 8, None), (16, 4096, 6144, 4, 128),  # the 8B QKV shape
    (4, 14336, 4096, 4, 128), (64, 14336, 4096, 8, None),  # down_proj: K over every warp many times
    (8, 2048, 16384, 4, 512), (32, 1152, 48, 4, 384),  # K groups larger than a chunk; K not a power of two
    (2, 65536, 16, 8, None),  # the longest row-scaled K (int32 sum exact)
    (64, 14336, 4096, 4, 128), (64, 4096, 28672, 4, 128), (48, 4096, 6144, 8, None),  # configuration 3 at M > 32
    (64, 28672, 128, 8, None),  # configuration 3: the x slice (64 x 3584 bytes) past its shared memory: declines
])
def test_skinny_model_shapes(m, k, n, bits, group_size):
    check(m, k, n, bits, group_size, torch.float16, "silu" if n > 4096 else "none", with_bias=False,
          with_res=n == 4096, seed=m + k + n)


@pytest.mark.parametrize("m", [1, 8, 9, 17, 33, 64])
@pytest.mark.parametrize("k", [128, 384, 1152, 2048])  # K splits over the cluster: 1, 2 (2 + 1 chunks), 8 (two
                                                       # empty ranks), 8 (2 chunks each) at N = 128 on 132 SMs
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 128), (4, None), (8, 128)])
def test_skinny_cluster_configuration(m, k, bits, group_size):
    """Configuration 3 (128 weight rows a block, K split over a cluster, partial tiles summed through distributed
    shared memory) at the split edges; N = 384 is three row tiles."""
    for n in (128, 384):
        check(m, k, n, bits, group_size, torch.bfloat16 if m % 2 else torch.float16, ACTS[(m + k) % 5],
              with_bias=k > 128, with_res=m % 3 == 0, seed=m + k + n + bits)


@pytest.mark.parametrize("case", ["m65", "k_not_128", "group_64", "n_not_16", "x_misaligned", "row_k_too_long",
                                  "a16"])
def test_skinny_declines_outside_its_contract(case):
    m, k, n, bits, group_size = {"m65": (65, 256, 32, 8, None), "k_not_128": (4, 192, 32, 8, None),
                                 "group_64": (4, 256, 32, 4, 64), "n_not_16": (4, 256, 24, 8, None),
                                 "x_misaligned": (4, 256, 32, 8, None), "row_k_too_long": (1, 65536 + 128, 16, 8, None),
                                 "a16": (4, 256, 32, 8, None)}[case]
    xq, xs, wq, ws, bias, res = make_gemm(m, k, n, bits, group_size, torch.float16, seed=3)
    if case == "x_misaligned":
        xq = torch.zeros(m * k + 1, dtype=torch.int8, device=DEV)[1:].view(m, k)
    if case == "a16":
        xq, xs = xq.half(), None
    out = torch.full((m, n), float("nan"), dtype=torch.float16, device=DEV)
    rc = cuda_gemm.launch_gemm("skinny", xq, None if xs is None else xs.reshape(m), wq, ws, bias, res, "none", bits,
                               out)
    torch.cuda.synchronize()
    assert rc == cuda_gemm.CUDA_ERROR_NOT_SUPPORTED
    assert torch.isnan(out).all()


def test_skinny_is_deterministic_and_graph_safe():
    """Same bits on every call and inside a CUDA graph replay (the partial tiles are summed in warp order)."""
    xq, xs, wq, ws, bias, res = make_gemm(16, 4096, 1024, 4, 128, torch.float16, seed=5)
    out = torch.empty(16, 1024, dtype=torch.float16, device=DEV)
    cuda_gemm.run_gemm("skinny", xq, xs.reshape(16), wq, ws, bias, None, "none", 4, out)
    first = out.clone()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cuda_gemm.run_gemm("skinny", xq, xs.reshape(16), wq, ws, bias, None, "none", 4, out)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        cuda_gemm.run_gemm("skinny", xq, xs.reshape(16), wq, ws, bias, None, "none", 4, out)
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, first)


def test_skinny_through_the_chooser_and_op():
    """On sm_90 the chooser takes it for decode M with INT4 K groups and the op serves the call with it, numbers as
    the reference; an M past 64 goes to the next kernel."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the measured policy takes it on sm_90 only")
    with G.skinny_mode("auto"):
        for m, want in [(1, "skinny"), (16, "skinny"), (64, "skinny"), (65, None)]:
            xq, xs, wq, ws, bias, res = make_gemm(m, 512, 256, 4, 128, torch.float16, seed=m)
            with cuda_gemm.served_by() as s:
                y = torch.ops.zq.int8_gemm_dequant(xq, xs, wq, ws, bias, None, "gelu", 4, torch.float16)
            y_ref = ref("int8_gemm_dequant")(xq, xs, wq, ws, bias, None, "gelu", 4, torch.float16)
            assert_gemm_exact(y, y_ref)
            assert (want in s) if want else ("skinny" not in s), dict(s)
