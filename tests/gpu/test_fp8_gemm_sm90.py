"""The Hopper FP8 GEMM (zq_gemm_sm90_fp8: gemm_sm90.cuh's template on FP8 E4M3, fp32 accumulation) against the
reference op (quant_math.fp8_gemm_dequant, exact float64 sums), element by element: every tile configuration forced
(zq_gemm_sm90_fp8_config), fp16 and bf16 out, with and without bias, every activation, with and without residual,
M = 1, 7, 130, 1000 and N, K multiples of 16 off the tiles, into NaN-poisoned outputs with a guard row. Then its
contract (what it declines returns cudaErrorNotSupported with nothing written, the INT8 kernel's new pointer
declines too), the dispatcher, and the op path with the kernel turned on (ZQ_GEMM_SM90_FP8). Runs on an sm_90 GPU
with the kernel library built with the Hopper GEMMs; skips elsewhere."""
from __future__ import annotations

import ctypes

import pytest
import torch

from zqcompile.ops import quant_math as qm

from . import require_cuda

pytestmark = pytest.mark.gpu
require_cuda()

from zqcompile.plugins import cuda, cuda_gemm  # noqa: E402
from zqcompile.plugins import gemm_kernels as G  # noqa: E402

from .test_kernels import ACTS, DEV, ULP, make_gemm, rand_act, ref  # noqa: E402

if not cuda_gemm.sm90_usable(DEV):
    pytest.skip("needs an sm_90 GPU and the kernel library built with the Hopper GEMMs", allow_module_level=True)

CONFIGS = range(cuda._lib.zq_gemm_sm90_fp8_num_configs())
NS_KS = [(16, 16), (144, 272), (528, 1040), (4096, 4096)]  # (N, K): one short tile, off the 128 tiles, a model's
MS = [1, 7, 130, 1000]
NOT_SUPPORTED = cuda_gemm.CUDA_ERROR_NOT_SUPPORTED
# The kernel's sum against the reference's exact one: the tensor cores add FP8 products over 128 of K with fewer
# mantissa bits than fp32 (about 2^-13 relative per DeepSeek-V3's measurement on Hopper), then the mainloop adds
# those partial sums in fp32, in another order than float64's exact sum. Both errors are bounded by a multiple of
# sum_k |x_k w_k| (scaled), not of |acc|, which cancellation can make small; 2^-10 of it is 8x the tensor cores'
# rounding and 2^14 x fp32's, while a wrong scale, element or tile is off by O(1) of it. The output rounding adds
# one ulp of the result (the reference rounds its fp32 result once, the kernel its own).
ACC_REL = 2.0 ** -10


def fp8_gemm(m, n, k, out_dtype, seed, with_bias=True, with_res=False):
    """FP8 operands with outlier tokens / channels (rand_act) and an outlier weight row, bias and residual."""
    xq, xs = qm.quantize_per_token_fp8(rand_act((m, k), torch.float32, seed))
    g = torch.Generator(device=DEV).manual_seed(seed + 1)
    w = torch.randn((n, k), generator=g, device=DEV) * k ** -0.5
    w[n // 3] *= 20
    wq, ws = qm.quantize_weight_fp8(w)
    bias = (0.1 * torch.randn(n, device=DEV)).to(out_dtype) if with_bias else None
    res = torch.randn((m, n), device=DEV).to(out_dtype) if with_res else None
    return xq, xs, wq, ws, bias, res


def assert_fp8_close(y, y_ref, xq, xs, wq, ws):
    assert not torch.isnan(y).any(), "NaN in output (an element left unwritten?)"
    magnitude = (xq.double().abs() @ wq.double().abs().t()) * ws.double().reshape(1, -1) * xs.double().reshape(-1, 1)
    err = (y.double() - y_ref.double()).abs()
    bound = ULP[y.dtype] * torch.maximum(y.double().abs(), y_ref.double().abs()) + ACC_REL * magnitude + 1e-6
    bad = err > bound
    assert not bad.any(), (f"{bad.sum().item()} elements off, first at {tuple(bad.nonzero()[0].tolist())}: max abs "
                           f"error {err.max().item():.3e}")


def launch(xq, xs, wq, ws, bias, res, act, out, cfg) -> int:
    rc = cuda_gemm.launch_gemm("sm90_fp8", xq, None if xs is None else xs.reshape(-1), wq, ws, bias, res, act, 8, out,
                               config=cfg)
    torch.cuda.synchronize()
    return rc


def check(m, n, k, out_dtype, act, with_bias, with_res, seed, configs=CONFIGS):
    xq, xs, wq, ws, bias, res = fp8_gemm(m, n, k, out_dtype, seed, with_bias, with_res)
    y_ref = ref("fp8_gemm_dequant")(xq, xs, wq, ws, bias, res, act, out_dtype)
    for cfg in configs:
        buf = torch.full((m + 1, n), float("nan"), dtype=out_dtype, device=DEV)
        assert launch(xq, xs, wq, ws, bias, res, act, buf[:m], cfg) == 0, f"config {cfg}"
        assert_fp8_close(buf[:m], y_ref, xq, xs, wq, ws)
        assert torch.isnan(buf[m]).all(), f"config {cfg} wrote past row M"


def test_three_configurations():
    assert len(CONFIGS) == 3


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", NS_KS)
@pytest.mark.parametrize("m", MS)
def test_every_config_over_shapes(m, n, k, out_dtype):
    seed = m * 7 + n + k
    check(m, n, k, out_dtype, ACTS[seed % 5], with_bias=seed % 2 == 0, with_res=seed % 3 == 0, seed=seed)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("with_bias,with_res", [(False, False), (True, False), (False, True), (True, True)])
def test_every_config_every_epilogue(out_dtype, act, with_bias, with_res):
    for m in (7, 130):
        check(m, 528, 1040, out_dtype, act, with_bias, with_res, seed=m + len(act))


def test_the_library_pick_and_the_dispatcher():
    """cfg -1 (the library's pick) and zq_gemm_run (launch_gemm without a config) give the same result as the
    forced configurations; FP8 operands to an integer kernel are declined."""
    check(1000, 4096, 4096, torch.bfloat16, "silu", True, True, seed=3, configs=(-1,))
    xq, xs, wq, ws, bias, _ = fp8_gemm(64, 256, 512, torch.float16, seed=4)
    y_ref = ref("fp8_gemm_dequant")(xq, xs, wq, ws, bias, None, "gelu", torch.float16)
    out = torch.full((64, 256), float("nan"), dtype=torch.float16, device=DEV)
    assert cuda_gemm.launch_gemm("sm90_fp8", xq, xs.reshape(-1), wq, ws, bias, None, "gelu", 8, out) == 0
    assert_fp8_close(out, y_ref, xq, xs, wq, ws)
    for kernel in ("simt", "mma", "sm90"):  # the decode kernel takes FP8 (below)
        out.fill_(float("nan"))
        assert cuda_gemm.launch_gemm(kernel, xq, xs.reshape(-1), wq, ws, bias, None, "gelu", 8, out) == NOT_SUPPORTED
        assert torch.isnan(out).all(), f"{kernel} wrote FP8 operands"


# ---- FP8 in the decode kernel (zq_gemm_skinny configurations 0-2: mma.sync m16n8k32 e4m3) -------------------------
SKINNY_MS = [1, 2, 7, 8, 9, 16, 17, 31, 32, 33, 63, 64]


def run_skinny_fp8(xq, xs, wq, ws, bias, res, act, out_dtype, cfg):
    m, n = xq.shape[0], wq.shape[0]
    buf = torch.full((m + 1, n), float("nan"), dtype=out_dtype, device=DEV)
    rc = cuda_gemm.launch_gemm("skinny", xq, xs.reshape(m), wq, ws, bias, res, act, 8, buf[:m], config=cfg)
    torch.cuda.synchronize()
    return rc, buf


@pytest.mark.parametrize("m", SKINNY_MS)
@pytest.mark.parametrize("n,k", [(16, 128), (144, 1152), (528, 1024), (4096, 4096)])
def test_skinny_fp8_every_configuration(m, n, k):
    """Configurations 0-2 and the library's pick (-1) against the reference, NaN-poisoned outputs with a guard
    row; configuration 1 (32 rows a block) declines N % 32 != 0 and M > 32 with nothing written."""
    seed = 11 * m + n + k
    out_dtype = torch.float16 if seed % 2 else torch.bfloat16
    xq, xs, wq, ws, bias, res = fp8_gemm(m, n, k, out_dtype, seed, with_bias=seed % 3 != 0, with_res=seed % 4 == 0)
    act = ACTS[seed % 5]
    y_ref = ref("fp8_gemm_dequant")(xq, xs, wq, ws, bias, res, act, out_dtype)
    for cfg in (0, 1, 2, -1):
        rc, buf = run_skinny_fp8(xq, xs, wq, ws, bias, res, act, out_dtype, cfg)
        if cfg == 1 and (n % 32 or m > 32):
            assert rc == NOT_SUPPORTED and torch.isnan(buf).all(), "declined, yet wrote"
            continue
        assert rc == 0, f"config {cfg}: cudaError {rc}"
        assert_fp8_close(buf[:m], y_ref, xq, xs, wq, ws)
        assert torch.isnan(buf[m]).all(), f"config {cfg} wrote past row M"


@pytest.mark.parametrize("case", ["m65", "k_not_128", "config3", "config4", "x_int8", "float32_out"])
def test_skinny_fp8_declines_outside_its_contract(case):
    m, n, k = (65 if case == "m65" else 8), 256, (1040 if case == "k_not_128" else 1024)
    out_dtype = torch.float32 if case == "float32_out" else torch.bfloat16
    xq, xs, wq, ws, bias, _ = fp8_gemm(m, n, k, torch.bfloat16, seed=9)
    if case == "x_int8":  # FP8 weights with int8 activations: not a problem any kernel takes
        xq = xq.float().clamp(-127, 127).to(torch.int8)
    cfg = {"config3": 3, "config4": 4}.get(case, -1)
    buf = torch.full((m, n), float("nan"), dtype=out_dtype, device=DEV)
    rc = cuda_gemm.launch_gemm("skinny", xq, xs.reshape(m), wq, ws, None if out_dtype == torch.float32 else bias, None,
                               "none", 8, buf, config=cfg)
    torch.cuda.synchronize()
    assert rc == NOT_SUPPORTED and torch.isnan(buf).all()


def test_skinny_fp8_through_the_dispatcher_chooser_and_op():
    """zq_gemm_run with the skinny id serves FP8; the chooser plans skinny for decode M (sm90_fp8 its fallback),
    the op runs it, and a CUDA graph of it replays to the same bits."""
    xq, xs, wq, ws, bias, res = fp8_gemm(4, 1024, 2048, torch.bfloat16, seed=12, with_res=True)
    y_ref = ref("fp8_gemm_dequant")(xq, xs, wq, ws, bias, res, "silu", torch.bfloat16)
    out = torch.full((4, 1024), float("nan"), dtype=torch.bfloat16, device=DEV)
    assert cuda_gemm.launch_gemm("skinny", xq, xs.reshape(-1), wq, ws, bias, res, "silu", 8, out) == 0
    assert_fp8_close(out, y_ref, xq, xs, wq, ws)
    choice = cuda_gemm.chosen("fp8_gemm_dequant", xq, wq, ws, out_dtype=torch.bfloat16)
    assert choice.kernel is G.SKINNY and choice.fallback is G.SM90_FP8, choice
    with cuda_gemm.served_by() as s:
        y = torch.ops.zq.fp8_gemm_dequant(xq.reshape(2, 2, 2048), xs.reshape(2, 2, 1), wq, ws, bias,
                                          res.reshape(2, 2, 1024), "silu", torch.bfloat16)
    assert s == {"skinny": 1}
    assert torch.equal(y.reshape(4, 1024), out)
    graph, static = torch.cuda.CUDAGraph(), torch.empty_like(out)
    with torch.cuda.graph(graph):
        static.copy_(torch.ops.zq.fp8_gemm_dequant(xq, xs, wq, ws, bias, res, "silu", torch.bfloat16))
    for _ in range(3):
        static.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static, out)


def _offset(t: torch.Tensor, elems: int) -> torch.Tensor:
    """t's values in a fresh buffer starting `elems` elements past a 256-byte boundary (misaligned for TMA)."""
    flat = torch.empty(t.numel() + elems, dtype=t.dtype, device=t.device)
    view = flat[elems:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("case", ["k % 16", "n % 16", "x misaligned", "wq misaligned", "out misaligned",
                                  "residual misaligned", "no x_scale", "K groups", "float32 out", "int8 x"])
def test_declines_outside_its_contract_with_nothing_written(case):
    m, n, k = 33, 256, 512
    n_, k_ = (n, 520) if case == "k % 16" else (264, k) if case == "n % 16" else (n, k)
    out_dtype = torch.float32 if case == "float32 out" else torch.float16
    xq, xs, wq, ws, bias, res = fp8_gemm(m, n_, k_, torch.float16, seed=9, with_res=True)
    out = torch.full((m, n_), float("nan"), dtype=out_dtype, device=DEV)
    if case == "x misaligned":
        xq = _offset(xq, 8)
    elif case == "wq misaligned":
        wq = _offset(wq, 4)
    elif case == "out misaligned":
        out = _offset(out, 2)
    elif case == "residual misaligned":
        res = _offset(res, 4)
    elif case == "no x_scale":
        xs = None
    elif case == "K groups":
        ws = ws.repeat(1, 2).contiguous()
    elif case == "float32 out":
        bias, res = bias.float(), res.float()
    elif case == "int8 x":
        xq, xs = qm.quantize_per_token(xq.float() * xs)
    for cfg in (-1, *CONFIGS):
        assert launch(xq, xs, wq, ws, bias, res, "none", out, cfg) == NOT_SUPPORTED, (case, cfg)
        assert torch.isnan(out).all(), f"{case}: declined, yet wrote"


@pytest.mark.parametrize("case", ["out misaligned", "x misaligned", "no w_scale"])
def test_int8_sm90_declines_misaligned_pointers_and_missing_scales(case):
    m, k, n = 130, 1024, 768
    xq, xs, wq, ws, bias, _ = make_gemm(m, k, n, 8, None, torch.float16, seed=2)
    out = torch.full((m, n), float("nan"), dtype=torch.float16, device=DEV)
    if case == "out misaligned":
        out = _offset(out, 4)
    elif case == "x misaligned":
        xq = _offset(xq, 8)
    a = cuda_gemm._args(xq, xs.reshape(m), wq, ws, bias, None, "none", 8, out)
    if case == "no w_scale":
        a.w_scale = None
    for cfg in range(-1, cuda._lib.zq_gemm_sm90_num_configs()):
        assert cuda._lib.zq_gemm_sm90_config(ctypes.byref(a), cfg, cuda._stream(xq)) == NOT_SUPPORTED
    torch.cuda.synchronize()
    assert torch.isnan(out).all()


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_op_path_serves_sm90_fp8_when_on_and_scaled_mm_otherwise(out_dtype):
    """torch.ops.zq.fp8_gemm_dequant on 3-D activations: the chooser's kernel serves the call (sm90_fp8, the
    default; scaled_mm with ZQ_GEMM_SM90_FP8=0), both within their tolerance of the reference."""
    xq, xs, wq, ws, bias, res = fp8_gemm(2 * 65, 1024, 2048, out_dtype, seed=5, with_res=True)
    x3, xs3, res3 = xq.reshape(2, 65, 2048), xs.reshape(2, 65, 1), res.reshape(2, 65, 1024)
    y_ref = ref("fp8_gemm_dequant")(xq, xs, wq, ws, bias, res, "silu", out_dtype)
    with G.sm90_fp8_mode("1"), cuda_gemm.served_by() as s:
        y = torch.ops.zq.fp8_gemm_dequant(x3, xs3, wq, ws, bias, res3, "silu", out_dtype)
    assert s == {"sm90_fp8": 1} and y.shape == (2, 65, 1024) and y.dtype == out_dtype
    assert_fp8_close(y.reshape(130, 1024), y_ref, xq, xs, wq, ws)
    with G.sm90_fp8_mode("0"), cuda_gemm.served_by() as s:
        y = torch.ops.zq.fp8_gemm_dequant(x3, xs3, wq, ws, bias, res3, "silu", out_dtype)
    assert s == {"scaled_mm": 1}
    # scaled_mm's row-wise path writes bf16 before the PyTorch epilogue: 2^-8 relative (tests/gpu/test_fp8_gpu.py)
    assert (y.reshape(130, 1024).float() - y_ref.float()).abs().max() <= 2 ** -7 * y_ref.float().abs().max()
