"""The CUDA kernels of libzq_kernels.so against the reference zq ops, on fresh random data with outlier
tokens and channels, at sizes that are not multiples of the tiles, M from 1 to 16384. Output memory is
poisoned (NaN / 0xFF) before each call so unwritten elements fail. Runs on a CUDA machine with the library
built (`cmake -S . -B build && cmake --build build -j`); skips elsewhere."""
from __future__ import annotations

import pytest
import torch

import zqcompile  # noqa: F401  registers the zq ops
from zqcompile.ops import registry
from zqcompile.ops import quant_math as qm

from . import require_cuda

pytestmark = pytest.mark.gpu
require_cuda()

from zqcompile.plugins import cuda, cuda_gemm  # noqa: E402
from zqcompile.plugins import gemm_kernels as G  # noqa: E402

DEV = "cuda"
FLOATS = [torch.float16, torch.bfloat16, torch.float32]


def ref(name):
    return registry.op(name).reference


def poison():
    """Fill (and free) a large block so the caching allocator hands out garbage-filled outputs."""
    b = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
    b.fill_(0xFF)
    del b


def rand_act(shape, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=DEV, dtype=torch.float32)
    rows = x.reshape(-1, shape[-1])
    rows[:: max(1, rows.shape[0] // 3)] *= 50.0  # outlier tokens
    x[..., 7 % shape[-1]] *= 30.0  # an outlier channel
    return x.to(dtype)


def assert_q_close(q, q_ref, max_diff=1, frac=1e-3):
    d = (q.int() - q_ref.int()).abs()
    assert d.max().item() <= max_diff, f"int8 codes differ by {d.max().item()}"
    assert (d > 0).float().mean().item() <= frac, f"{(d > 0).float().mean().item():.2e} of the codes differ"


def assert_fp8_close(q, q_ref, frac):
    """FP8 E4M3 codes within one step of the reference's (a float input an ulp apart can round to the next
    code: 2^-3 relative, 2^-9 among subnormals), and at most `frac` of them different."""
    assert q.dtype == q_ref.dtype == qm.FP8_DTYPE
    a, b = q.float(), q_ref.float()
    assert not torch.isnan(a).any(), "NaN code (0x7f / 0xff: an element left unwritten?)"
    assert ((a - b).abs() <= 2 ** -3 * b.abs() + 2 ** -9).all(), f"codes differ by {(a - b).abs().max().item()}"
    assert (a != b).float().mean().item() <= frac, f"{(a != b).float().mean().item():.2e} of the codes differ"


def assert_close(y, y_ref, rel):
    assert not torch.isnan(y).any(), "NaN in output (an element left unwritten?)"
    err = (y.float() - y_ref.float()).abs().max().item()
    bound = rel * y_ref.float().abs().max().item() + 1e-6
    assert err <= bound, f"max abs error {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,k", [(1, 768), (3, 1000), (17, 4096), (1000, 777), (16384, 1024), (2, 20000)])
def test_quantize_per_token(dtype, m, k):
    x = rand_act((m, k), dtype, seed=m * 7 + k)
    poison()
    q, s = torch.ops.zq.quantize_per_token(x)
    q_ref, s_ref = ref("quantize_per_token")(x)
    assert_q_close(q, q_ref, max_diff=1, frac=1e-4)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_per_tensor(dtype):
    x = rand_act((4, 33, 768), dtype, seed=3)
    scale = torch.tensor(x.float().abs().amax().item() / 127 * 0.5, device=DEV)  # half: some values clamp
    poison()
    q, s = torch.ops.zq.quantize_per_tensor(x, scale)
    q_ref, s_ref = ref("quantize_per_tensor")(x, scale)
    assert_q_close(q, q_ref, max_diff=1, frac=1e-4)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("with_res,emit_out,emit_sum", [(False, False, False), (True, True, True), (True, False, True)])
@pytest.mark.parametrize("m,k", [(1, 768), (37, 1000), (4096, 4096), (3, 16384)])
def test_norm_quant(dtype, kind, with_res, emit_out, emit_sum, m, k):
    x = rand_act((m, k), dtype, seed=m + k)
    res = rand_act((m, k), dtype, seed=m + k + 1) if with_res else None
    w = (1 + 0.1 * torch.randn(k, device=DEV)).to(dtype)
    b = (0.1 * torch.randn(k, device=DEV)).to(dtype) if kind == "layer" else None
    poison()
    got = torch.ops.zq.norm_quant(x, res, w, b, 1e-5, kind, emit_out, emit_sum)
    exp = ref("norm_quant")(x, res, w, b, 1e-5, kind, emit_out, emit_sum)
    assert_q_close(got[0], exp[0], max_diff=1, frac=2e-3)
    torch.testing.assert_close(got[1], exp[1], rtol=1e-2, atol=0)
    for g, e in zip(got[2:], exp[2:]):
        assert g.shape == e.shape
        if e.numel():
            assert_close(g, e, rel=1e-2)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("act", ["none", "gelu", "gelu_tanh", "relu", "silu"])
@pytest.mark.parametrize("mode", ["bias", "gate", "plain"])
@pytest.mark.parametrize("m,k", [(1, 3072), (129, 1000), (2048, 4096)])
def test_act_quant(dtype, act, mode, m, k):
    x = rand_act((m, k), dtype, seed=m * 3 + k)
    bias = (0.1 * torch.randn(k, device=DEV)).to(dtype) if mode == "bias" else None
    # gate * x with both carrying outliers would overflow fp16 (the reference then quantizes inf/NaN)
    gate = 0.02 * rand_act((m, k), dtype, seed=m * 5 + k) if mode == "gate" else None
    poison()
    got = torch.ops.zq.act_quant(x, bias, gate, act, True)
    exp = ref("act_quant")(x, bias, gate, act, True)
    assert_q_close(got[0], exp[0], max_diff=1, frac=2e-3)
    torch.testing.assert_close(got[1], exp[1], rtol=1e-2, atol=0)
    assert_close(got[2], exp[2], rel=1e-2)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("op", ["quantize_per_token_fp8", "norm_quant_fp8 layer", "norm_quant_fp8 rms+res",
                                "act_quant_fp8 gelu bias", "act_quant_fp8 silu gate"])
@pytest.mark.parametrize("m,k", [(1, 768), (3, 1000), (37, 4096), (1000, 777), (16384, 1024), (2, 20000)])
def test_fp8_producers_match_the_reference(dtype, op, m, k):
    """The FP8-emitting row kernels (zq_*_fp8) against the reference ops on the same GPU: codes within one E4M3
    step (saturation at 448 included: the outlier tokens sit at a row's amax), scales amax / 448."""
    x = rand_act((m, k), dtype, seed=m * 13 + k)
    w = (1 + 0.1 * torch.randn(k, device=DEV)).to(dtype)
    b = (0.1 * torch.randn(k, device=DEV)).to(dtype)
    args = {"quantize_per_token_fp8": (x,),
            "norm_quant_fp8 layer": (x, None, w, b, 1e-5, "layer", True, False),
            "norm_quant_fp8 rms+res": (x, 0.5 * x.flip(0), w, None, 1e-5, "rms", False, True),
            "act_quant_fp8 gelu bias": (x, b, None, "gelu", True),
            "act_quant_fp8 silu gate": (x, None, 0.02 * x.flip(1), "silu", False)}[op]
    name = op.split()[0]
    poison()
    got = getattr(torch.ops.zq, name)(*args)
    exp = ref(name)(*args)
    assert_fp8_close(got[0], exp[0], frac=1e-4 if name == "quantize_per_token_fp8" else 2e-3)
    assert got[0].float().abs().amax().item() == 448.0  # every row's amax maps to the largest code
    torch.testing.assert_close(got[1], exp[1], rtol=1e-6 if name == "quantize_per_token_fp8" else 1e-2, atol=0)
    for g, e in zip(got[2:], exp[2:]):
        assert g.shape == e.shape
        if e.numel():
            assert_close(g, e, rel=1e-2)


ROW_OPS = {  # op -> (inputs from x, the call): every row kernel with the split-row layout
    "quantize_per_token": lambda x, d: torch.ops.zq.quantize_per_token(x),
    "norm_quant rms+res": lambda x, d: torch.ops.zq.norm_quant(x, 0.5 * x.flip(0), d["w"], None, 1e-5, "rms", True, True),
    "norm_quant layer": lambda x, d: torch.ops.zq.norm_quant(x, None, d["w"], d["b"], 1e-5, "layer", True, False),
    "act_quant silu gate": lambda x, d: torch.ops.zq.act_quant(x, None, 0.002 * x.flip(1), "silu", True),
    "act_quant gelu bias": lambda x, d: torch.ops.zq.act_quant(x, d["b"], None, "gelu", False),
    "quantize_per_token_fp8": lambda x, d: torch.ops.zq.quantize_per_token_fp8(x),
    "norm_quant_fp8 rms+res": lambda x, d: torch.ops.zq.norm_quant_fp8(x, 0.5 * x.flip(0), d["w"], None, 1e-5, "rms",
                                                                      True, True),
    "act_quant_fp8 silu gate": lambda x, d: torch.ops.zq.act_quant_fp8(x, None, 0.002 * x.flip(1), "silu", True),
}


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,k", [(1, 14336), (4, 4096), (16, 8200), (33, 2056), (1, 57344), (2, 1032), (40, 4096)])
def test_row_kernels_split_rows_match_one_block_rows(dtype, m, k):
    """Few long rows split over a cluster of 8 blocks (decode) against the one-block-a-row layout and the
    reference: maxima exact (same codes and scales), the norms' sums in another order (codes within one)."""
    d = {"w": (1 + 0.1 * torch.randn(k, device=DEV)).to(dtype), "b": (0.1 * torch.randn(k, device=DEV)).to(dtype)}
    x = rand_act((m, k), dtype, seed=m * 11 + k)
    try:
        for name, call in ROW_OPS.items():
            outs = []
            for split in (0, 64):
                cuda.set_row_split(split)
                poison()
                outs.append(call(x, d))
            base, got = outs
            exact = not name.startswith("norm_quant")
            for g, b in zip(got, base):
                assert g.shape == b.shape, name
                if g.dtype == qm.FP8_DTYPE:
                    if exact:
                        assert torch.equal(g.view(torch.uint8), b.view(torch.uint8)), name
                    else:
                        assert_fp8_close(g, b, frac=2e-3)
                elif g.dtype == torch.int8:
                    if exact:
                        assert torch.equal(g, b), name
                    else:
                        assert_q_close(g, b, max_diff=1, frac=2e-3)
                elif exact:
                    assert not torch.isnan(g).any(), f"{name}: NaN (an element left unwritten?)"
                    assert torch.equal(g, b), name
                elif g.numel():
                    assert_close(g, b, rel=1e-2)
    finally:
        cuda.set_row_split(-1)


def make_gemm(m, k, n, bits, group_size, out_dtype, seed, with_bias=True, with_res=False):
    x = rand_act((m, k), torch.float32, seed)
    xq, xs = qm.quantize_per_token(x)
    g = torch.Generator(device=DEV).manual_seed(seed + 1)
    w = torch.randn((n, k), generator=g, device=DEV) * 0.05
    w[n // 3] *= 20  # an outlier output row
    gran = "k_groups" if group_size else "row_groups"
    wq, ws = qm.quantize_weight(w, bits, gran, group_size=group_size)
    bias = (0.1 * torch.randn(n, device=DEV)).to(out_dtype) if with_bias else None
    res = torch.randn((m, n), device=DEV).to(out_dtype) if with_res else None
    return xq, xs, wq, ws, bias, res


GEMM_SHAPES = [(1, 768, 3072), (4, 1024, 1024), (5, 4096, 1024), (16, 3072, 768), (17, 1024, 4096), (100, 768, 520),
               (1000, 1000, 515), (4096, 4096, 4096), (16384, 768, 3072)]


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, None), (4, 128), (8, 64)])
def test_int8_gemm_dequant(out_dtype, m, k, n, bits, group_size):
    if group_size and k % group_size:
        pytest.skip("group size must divide K")
    if bits == 4 and k % 2:
        pytest.skip("INT4 needs an even K")
    xq, xs, wq, ws, bias, res = make_gemm(m, k, n, bits, group_size, out_dtype, seed=m + k + n, with_res=m % 2 == 0)
    act = ["none", "gelu", "gelu_tanh", "relu", "silu"][(m + n) % 5]
    poison()
    y = torch.ops.zq.int8_gemm_dequant(xq, xs, wq, ws, bias, res, act, bits, out_dtype)
    y_ref = ref("int8_gemm_dequant")(xq, xs, wq, ws, bias, res, act, bits, out_dtype)
    assert y.shape == y_ref.shape and y.dtype == out_dtype
    assert_close(y, y_ref, rel=1e-2 if group_size and m > G.SMALL_M_KGROUPS else 4e-3)


def mma_usable() -> bool:
    return torch.cuda.get_device_capability(torch.device(DEV)) >= (8, 0)


def gemm_configs(path: str) -> range:
    if path == "sm90":
        return range(cuda._lib.zq_gemm_sm90_num_configs())
    if path == "mma":
        return range(cuda._lib.zq_gemm_mma_num_configs())
    return range(-1, 0)


@pytest.mark.parametrize("path", ["simt", "sm90", "mma"])
@pytest.mark.parametrize("act", ["none", "gelu", "gelu_tanh", "relu", "silu"])
@pytest.mark.parametrize("with_bias,with_res", [(False, False), (True, True), (True, False)])
@pytest.mark.parametrize("m,k,n", [(1, 768, 3072), (64, 1024, 768), (300, 4096, 1032), (2048, 3072, 768)])
def test_gemm_paths_poisoned(path, act, with_bias, with_res, m, k, n):
    """Each GEMM kernel directly, every epilogue variant, into a NaN-filled output."""
    if path == "sm90" and not cuda_gemm.sm90_usable(DEV):
        pytest.skip("no Hopper INT8 GEMM on this device/library")
    if path == "mma" and not mma_usable():
        pytest.skip("the mma GEMM needs sm_80 or later")
    out_dtype = torch.float16
    xq, xs, wq, ws, bias, res = make_gemm(m, k, n, 8, None, out_dtype, seed=m * k, with_bias=with_bias,
                                          with_res=with_res)
    configs = gemm_configs(path)
    y_ref = ref("int8_gemm_dequant")(xq, xs, wq, ws, bias, res, act, 8, out_dtype)
    for cfg in configs:
        out = torch.full((m, n), float("nan"), dtype=out_dtype, device=DEV)
        cuda_gemm.run_gemm(path, xq, xs.reshape(m), wq, ws, bias, res, act, 8, out, config=cfg)
        assert_close(out, y_ref, rel=4e-3)


# ---- the mma tensor-core GEMM (zq_gemm_mma): every tile configuration on edge shapes -------------------------
ACTS = ["none", "gelu", "gelu_tanh", "relu", "silu"]
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def assert_gemm_exact(y, y_ref):
    """Element-wise: the kernel's fp32 result rounds to within one output ulp of the reference's (the INT32
    accumulation is exact; only fp32 scaling and the final rounding differ), plus fp32 noise near zero. Much
    tighter than assert_close, whose bound is relative to the largest (outlier) output."""
    assert not torch.isnan(y).any(), "NaN in output (an element left unwritten?)"
    err = (y.float() - y_ref.float()).abs()
    bound = ULP[y.dtype] * torch.maximum(y.float().abs(), y_ref.float().abs()) + 1e-4 * y_ref.float().abs().max()
    bad = err > bound
    assert not bad.any(), (f"{bad.sum().item()} elements off, first at {tuple(bad.nonzero()[0].tolist())}: "
                           f"max abs error {err.max().item():.3e}")


def run_mma_all_configs(xq, xs, wq, ws, bias, res, act, bits, y_ref):
    """Every mma tile configuration into a NaN-filled output with a NaN guard row after it (catches stores
    past row M)."""
    m, n = y_ref.shape
    for cfg in gemm_configs("mma"):
        buf = torch.full((m + 1, n), float("nan"), dtype=y_ref.dtype, device=DEV)
        cuda_gemm.run_gemm("mma", xq, xs.reshape(m), wq, ws, bias, res, act, bits, buf[:m], config=cfg)
        assert_gemm_exact(buf[:m], y_ref)
        assert torch.isnan(buf[m]).all(), f"config {cfg} wrote past row M"


def mma_cases():
    for m in [1, 17, 100, 128, 129, 1000, 4096]:
        for k, n in [(32, 8), (96, 136), (768, 3072), (3072, 768)]:
            for bits in (4, 8):
                for group_size in (None, 32, 64, 96, 128, 256):
                    if group_size is None or (group_size < k and k % group_size == 0):
                        yield m, k, n, bits, group_size


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n,bits,group_size", list(mma_cases()))
def test_gemm_mma(out_dtype, m, k, n, bits, group_size):
    """W4A8 / W8A8, row and K-group scales (group_k 32: two groups per 64-wide k slice; 96: groups across
    slices; 256: the exact-I2F fold), M, N, K off the tiles (K = 32, 96: a half slice at the end)."""
    if not mma_usable():
        pytest.skip("the mma GEMM needs sm_80 or later")
    seed = m * 31 + k + n + bits
    xq, xs, wq, ws, bias, res = make_gemm(m, k, n, bits, group_size, out_dtype, seed=seed,
                                          with_bias=seed % 3 != 0, with_res=seed % 2 == 0)
    assert ws.shape[1] == (k // group_size if group_size else 1)
    act = ACTS[seed % 5]
    y_ref = ref("int8_gemm_dequant")(xq, xs, wq, ws, bias, res, act, bits, out_dtype)
    run_mma_all_configs(xq, xs, wq, ws, bias, res, act, bits, y_ref)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("with_bias,with_res", [(False, False), (True, True), (True, False), (False, True)])
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, None), (4, 128), (8, 32)])
def test_gemm_mma_epilogues(out_dtype, act, with_bias, with_res, bits, group_size):
    if not mma_usable():
        pytest.skip("the mma GEMM needs sm_80 or later")
    m, k, n = 300, 1024, 1032
    xq, xs, wq, ws, bias, res = make_gemm(m, k, n, bits, group_size, out_dtype, seed=5, with_bias=with_bias,
                                          with_res=with_res)
    y_ref = ref("int8_gemm_dequant")(xq, xs, wq, ws, bias, res, act, bits, out_dtype)
    run_mma_all_configs(xq, xs, wq, ws, bias, res, act, bits, y_ref)


@pytest.mark.parametrize("m,k,n,p_low", [(130, 4096, 136, 0.9), (20, 65536, 16, 1.0)])
@pytest.mark.parametrize("bits", [8, 4])
def test_gemm_mma_extreme_codes(m, k, n, p_low, bits):
    """Codes at the int8 / INT4 extremes (x -127/-128 times w -128 or -8, every product 2^14 at p_low = 1, up to
    the largest K the kernel takes): the int32 accumulation and the INT4 unpack (nibble << 4, scaled back by
    1/16) stay exact."""
    if not mma_usable():
        pytest.skip("the mma GEMM needs sm_80 or later")
    g = torch.Generator(device=DEV).manual_seed(9)
    xq = -127 - torch.randint(0, 2, (m, k), generator=g, device=DEV, dtype=torch.int8)
    if p_low == 1.0:
        xq.fill_(-128)
    xs = torch.rand((m, 1), generator=g, device=DEV) * 1e-3
    lo, hi = (-128, 127) if bits == 8 else (-8, 7)
    w = torch.where(torch.rand((n, k), generator=g, device=DEV) < p_low, lo, hi).to(torch.int8)
    wq = qm.pack_int4(w) if bits == 4 else w
    for groups in (1, k // 1024, k // 32):  # row scales; K groups folded through I2F / the float bit pattern
        ws = torch.rand((n, groups), generator=g, device=DEV) * 1e-2
        y_ref = ref("int8_gemm_dequant")(xq, xs, wq, ws, None, None, "none", bits, torch.bfloat16)
        run_mma_all_configs(xq, xs, wq, ws, None, None, "none", bits, y_ref)


@pytest.mark.parametrize("case", ["k_not_32", "n_not_8", "group_16", "fp32_out", "x_misaligned", "a16"])
def test_gemm_mma_declines_outside_contract(case):
    """Outside its contract the kernel returns cudaErrorNotSupported and writes nothing; the op then takes
    another path and still matches the reference."""
    if not mma_usable():
        pytest.skip("the mma GEMM needs sm_80 or later")
    m, k, n, group_size, out_dtype = 40, 256, 64, 64, torch.float16
    k, n, group_size = {"k_not_32": (272, 64, None), "n_not_8": (256, 60, 64), "group_16": (256, 64, 16)}.get(
        case, (k, n, group_size))
    out_dtype = torch.float32 if case == "fp32_out" else out_dtype
    xq, xs, wq, ws, bias, res = make_gemm(m, k, n, 8, group_size, out_dtype, seed=3, with_res=True)
    x_arg = xq
    if case == "x_misaligned":
        x_arg = torch.empty(m * k + 8, dtype=torch.int8, device=DEV)[8:].view(m, k)
        x_arg.copy_(xq)
    elif case == "a16":
        x_arg = xq.to(torch.float16)
    out = torch.full((m, n), float("nan"), dtype=out_dtype, device=DEV)
    rc = cuda_gemm.launch_gemm("mma", x_arg, xs.reshape(m), wq, ws, bias, res, "none", 8, out)
    torch.cuda.synchronize()
    assert rc == cuda_gemm.CUDA_ERROR_NOT_SUPPORTED
    assert torch.isnan(out).all()
    if case != "a16":
        y = torch.ops.zq.int8_gemm_dequant(x_arg, xs, wq, ws, bias, res, "none", 8, out_dtype)
        y_ref = ref("int8_gemm_dequant")(xq, xs, wq, ws, bias, res, "none", 8, out_dtype)
        assert_close(y, y_ref, rel=1e-2)


@pytest.mark.parametrize("m,k,n,bits,group_size,path", [
    (17, 1024, 768, 4, 128, "skinny or mma"), (17, 1024, 768, 8, 32, "mma"), (16, 1024, 768, 4, 128, "skinny or simt"),
    (5, 1024, 768, 4, None, "skinny or mma"), (4, 1024, 768, 4, None, "skinny or simt"),
    (2048, 4096, 1024, 4, 64, "mma"), (64, 1024, 768, 8, None, "skinny or mma"), (65, 1024, 768, 8, None, "sm90 or mma"),
    (64, 2048, 768, 8, None, "skinny or mma"), (64, 1024, 4096, 8, None, "mma"), (33, 4096, 6144, 8, None, "sm90 or mma"),
    (65, 1024, 768, 4, None, "sm90 or mma"), (1025, 1024, 3072, 4, 128, "wgmma or mma"),
    (2049, 1024, 768, 4, 128, "wgmma or mma"), (65, 1024, 768, 8, 128, "wgmma or mma"), (64, 1024, 768, 4, 32, "mma")])
def test_int8_gemm_dequant_routes_to_mma(m, k, n, bits, group_size, path):
    """On sm_90 the decode-shaped kernel takes M <= 64 where its contract holds (K % 128, N % 16, K groups of a
    multiple of 128) and, for INT8 row scales, where it was measured fastest (N <= 4096 at M 17-32, N <= 2048 at
    33-64). Else the mma kernel takes K-group scales for SMALL_M_KGROUPS < M <= MMA_KGROUP_MAX_M (every M for
    N <= 1024), INT4 row scales and short-K INT8 row scales for SMALL_M < M <= MMA_ROW_MAX_M, and every M above
    SMALL_M where there is no Hopper kernel (A100); past those limits Hopper runs its own kernels: for K groups
    (K, N and the group size multiples of 128) at M > 64 the Hopper K-group kernel, for row scales the CUTLASS one."""
    if not mma_usable():
        pytest.skip("the mma GEMM needs sm_80 or later")
    if " or " in path:  # the first on sm_90 (wgmma: sm_90a code, always built; sm90 / skinny: with the library's)
        first = path.split(" or ")[0]
        hopper = torch.cuda.get_device_capability() == (9, 0) if first == "wgmma" else cuda_gemm.sm90_usable(DEV)
        path = path.split(" or ")[0 if hopper else 1]
    xq, xs, wq, ws, bias, res = make_gemm(m, k, n, bits, group_size, torch.bfloat16, seed=m + k, with_res=True)
    poison()
    with cuda_gemm.served_by() as served:
        y = torch.ops.zq.int8_gemm_dequant(xq, xs, wq, ws, bias, res, "silu", bits, torch.bfloat16)
    assert served == {path: 1}
    assert cuda_gemm.chosen("int8_gemm_dequant", xq, wq, ws, bias, res, bits, torch.bfloat16).kernel.name == path
    y_ref = ref("int8_gemm_dequant")(xq, xs, wq, ws, bias, res, "silu", bits, torch.bfloat16)
    if path in ("mma", "skinny", "wgmma"):
        assert_gemm_exact(y, y_ref)
    else:
        assert_close(y, y_ref, rel=4e-3 if path != "fp16_dequant" else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", [(1, 768, 3072), (7, 1000, 515), (16, 4096, 1024), (333, 1024, 768)])
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 128)])
def test_weight_only_gemm(dtype, m, k, n, bits, group_size):
    if group_size and k % group_size:
        pytest.skip("group size must divide K")
    x = rand_act((m, k), dtype, seed=m + n)
    w = torch.randn((n, k), device=DEV) * 0.05
    wq, ws = qm.quantize_weight(w, bits, "k_groups" if group_size else "row_groups", group_size=group_size)
    bias = (0.1 * torch.randn(n, device=DEV)).to(dtype)
    res = torch.randn((m, n), device=DEV).to(dtype)
    poison()
    y = torch.ops.zq.weight_only_gemm(x, wq, ws, bias, res, "gelu", bits)
    y_ref = ref("weight_only_gemm")(x, wq, ws, bias, res, "gelu", bits)
    assert_close(y, y_ref, rel=1e-2)


def test_fallback_for_unsupported_dtypes_matches_reference():
    """Mixed dtypes are answered by the reference implementation, not a wrong kernel."""
    x = rand_act((4, 64), torch.float16, seed=1)
    w = torch.ones(64, device=DEV, dtype=torch.float32)
    before = sum(n for (op, _), n in cuda.fallbacks.items() if op == "norm_quant")
    got = torch.ops.zq.norm_quant(x, None, w, None, 1e-5, "rms", True, False)
    assert sum(n for (op, _), n in cuda.fallbacks.items() if op == "norm_quant") == before + 1  # counted, warned
    exp = ref("norm_quant")(x, None, w, None, 1e-5, "rms", True, False)
    assert torch.equal(got[0], exp[0])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("op", ["act_quant", "act_quant_fp8"])
@pytest.mark.parametrize("m,k,split", [(1, 14336, -1), (16, 4096, -1), (16, 4096, 0), (33, 1000, -1),
                                       (64, 256, 0), (3, 100, -1), (2048, 4096, -1)])
def test_act_quant_reads_the_halves_of_a_fused_gate_up_output_in_place(dtype, op, m, k, split):
    """x and gate as the two halves of a [m, 2k] gate/up GEMM output (strided rows, pitch 2k): read in place
    (cuda.act_quant_strided) the codes, scales and output equal the contiguous copies' bit for bit (vector,
    split-row and scalar paths: k % 8 != 0 takes the scalar kernel), and the reference's within one code."""
    # gate * x with both carrying outliers would overflow fp16: the gate half scaled down
    y = torch.cat([0.02 * rand_act((m, 1, k), dtype, seed=m * 7 + k), rand_act((m, 1, k), dtype, seed=m + k)], -1)
    gate, x = y[..., :k], y[..., k:]
    assert m == 1 or (not x.is_contiguous() and not gate.is_contiguous())
    fn = getattr(torch.ops.zq, op)
    before = cuda.act_quant_strided  # the library's default (on)
    try:
        cuda.set_row_split(split)
        outs = []
        for strided in (False, True):
            cuda.act_quant_strided = strided
            poison()
            outs.append(fn(x, None, gate, "silu", True))
    finally:
        cuda.act_quant_strided = before
        cuda.set_row_split(-1)
    (q0, s0, o0), (q1, s1, o1) = outs
    view = (lambda t: t.view(torch.uint8)) if op.endswith("fp8") else (lambda t: t)
    assert torch.equal(view(q1), view(q0)) and torch.equal(s1, s0) and torch.equal(o1, o0)
    exp = ref(op)(x, None, gate, "silu", True)
    if not op.endswith("fp8"):
        assert_q_close(q1, exp[0], max_diff=1, frac=2e-3)
    torch.testing.assert_close(s1, exp[1], rtol=1e-2, atol=0)
    assert_close(o1, exp[2], rel=1e-2)
