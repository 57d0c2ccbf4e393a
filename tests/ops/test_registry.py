"""A walk over the op registry: every declared zq op has its reference and fake implementation, passes
torch.library.opcheck on sample inputs (random, with outlier tokens and channels), has a CUDA kernel or is
declared reference-only on CUDA, and, when exported, has a standard-ONNX and a TensorRT-dialect translation
(a plugin node with its spec, or the standard lowering); runtime-only ops have none."""
from __future__ import annotations

import inspect
from typing import Callable

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import zqcompile.plugins.cuda  # noqa: F401 - records the CUDA kernels against the declarations
from zqcompile.export.onnx import translation_table
from zqcompile.graph_dump import COLOURS
from zqcompile.ops import GENERATION_OPS, OPS, registry
from zqcompile.ops import quant_math as qm
from zqcompile.plugins import trt_spec

DECLS = registry.declared()


def acts(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Activations with 50x outlier tokens and a 20x outlier channel, as in real LLMs."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    rows = x.view(-1, shape[-1])
    rows[:: max(1, rows.shape[0] // 3)] *= 50.0
    rows[:, 3 % shape[-1]] *= 20.0
    return x.to(dtype)


def weights(n: int, k: int, bits: int, granularity: str = "row_groups", group_size=None, seed: int = 7):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * k ** -0.5
    return qm.quantize_weight(w, bits, granularity, group_size=group_size)


def _quantize_per_token():
    return [(acts(2, 5, 48, seed=0),), (acts(3, 64, seed=1, dtype=torch.bfloat16),)]


def _quantize_per_token_fp8():
    return _quantize_per_token()


def _quantize_per_tensor():
    return [(acts(2, 5, 48, seed=2), torch.tensor(0.05))]


def _dequantize_per_token():
    q, s = qm.quantize_per_token(acts(2, 5, 48, seed=3))
    return [(q, s, torch.float32), (q, s, torch.bfloat16)]


def _dequantize_weight():
    return [(*weights(24, 64, 8), 8, torch.float32), (*weights(24, 64, 4, "k_groups", 32), 4, torch.float16)]


def _norm_quant():
    x, r = acts(2, 5, 48, seed=4), acts(2, 5, 48, seed=5)
    w, b = torch.rand(48) + 0.5, torch.randn(48)
    return [(x, r, w, b, 1e-5, "layer", True, True), (x, None, w, None, 1e-6, "rms", False, False),
            (x, r, w, None, 1e-6, "rms", True, False)]


def _act_quant():
    x, g, b = acts(6, 40, seed=6), acts(6, 40, seed=7), torch.randn(40)
    return [(x, b, None, "gelu", True), (x, None, g, "silu", False), (x, b, None, "gelu_tanh", False),
            (x, None, None, "none", True)]


def _fp8_gemm_dequant():
    xq, xs = qm.quantize_per_token_fp8(acts(2, 9, 64, seed=8))
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(7)) * 0.125
    b, res = torch.randn(32), acts(2, 9, 32, seed=9)
    return [(xq, xs, *qm.quantize_weight_fp8(w), b, res, "gelu", torch.float32),
            (xq, xs, *qm.quantize_weight_fp8(w), None, None, "none", torch.bfloat16)]


def _int8_gemm_dequant():
    xq, xs = qm.quantize_per_token(acts(2, 9, 64, seed=8))
    b, res = torch.randn(24), acts(2, 9, 24, seed=9)
    return [(xq, xs, *weights(24, 64, 8), b, res, "gelu", 8, torch.float32),
            (xq, xs, *weights(24, 64, 4, "k_groups", 32), None, None, "none", 4, torch.float16)]


def _weight_only_gemm():
    x = acts(3, 64, seed=10)
    return [(x, *weights(16, 64, 8), None, None, "none", 8),
            (x, *weights(16, 64, 4, "k_groups", 16), torch.randn(16), acts(3, 16, seed=11), "silu", 4)]


def _rope():
    q = acts(1, 5, 4, 16, seed=12).transpose(1, 2)  # [B, Hq, S, D] as a strided view, as attention makes it
    k = acts(1, 2, 5, 16, seed=13)
    cos, sin = torch.rand(1, 1, 5, 16), torch.rand(1, 1, 5, 16)
    return [(q, k, cos, sin)]


def _rope_kv_write():
    q, k, v = (acts(2, 3, h, 16, seed=s).transpose(1, 2) for h, s in ((4, 19), (2, 20), (2, 21)))  # strided views
    cos, sin = torch.rand(2, 1, 3, 16), torch.rand(2, 1, 3, 16)
    caches = [acts(2, 2, 8, 16, seed=s) for s in (22, 23)]
    return [(q, k, v, cos, sin, *caches, torch.tensor([5, 0, 2]))]


def _gqa_attention():
    q, k, v = acts(2, 4, 3, 16, seed=14), acts(2, 2, 7, 16, seed=15), acts(2, 2, 7, 16, seed=16)
    causal = torch.ones(3, 7, dtype=torch.bool).tril(4).expand(2, 1, 3, 7)
    return [(q, k, v, causal, 0.25), (q[:, :, :1], k, v, torch.ones(2, 1, 1, 7, dtype=torch.bool), 0.25)]


def _quant_attention():
    q, k, v = acts(2, 4, 3, 16, seed=24), acts(2, 2, 7, 16, seed=25), acts(2, 2, 7, 16, seed=26)
    pad = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    pad[1, ..., :2] = False
    additive = torch.zeros(2, 1, 3, 7).masked_fill(~pad, float("-inf"))
    return [(q, k, v, None, 0.25, True, False, False, False), (q, k, v, pad, 0.25, False, True, False, True),
            (q, k, v, additive, 0.25, False, False, True, True), (q[:, :, :1], k, v, pad, 0.25, False, True, True, True)]


def _all_reduce():
    """A process group of one rank (in memory: no port, no peer) makes the sum the input itself."""
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    name = dist.group.WORLD.group_name
    return [(acts(2, 5, 48, seed=17), name), (acts(3, 64, seed=18, dtype=torch.bfloat16), name)]


SAMPLES: dict[str, Callable[[], list[tuple]]] = {
    "quantize_per_token": _quantize_per_token, "quantize_per_tensor": _quantize_per_tensor,
    "dequantize_per_token": _dequantize_per_token, "dequantize_weight": _dequantize_weight,
    "norm_quant": _norm_quant, "act_quant": _act_quant, "int8_gemm_dequant": _int8_gemm_dequant,
    "quantize_per_token_fp8": _quantize_per_token_fp8, "norm_quant_fp8": _norm_quant, "act_quant_fp8": _act_quant,
    "fp8_gemm_dequant": _fp8_gemm_dequant,
    "weight_only_gemm": _weight_only_gemm, "rope": _rope, "rope_kv_write": _rope_kv_write,
    "gqa_attention": _gqa_attention, "quant_attention": _quant_attention,
    "all_reduce": _all_reduce,
}


def samples_of(decl: registry.OpDecl) -> list[tuple]:
    if decl.name not in SAMPLES:
        pytest.fail(f"{decl.qualname} has no sample inputs: add a factory to SAMPLES in tests/ops/test_registry.py "
                    f"(small random inputs with outliers, every optional input present and absent)")
    return SAMPLES[decl.name]()


def _flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize("decl", DECLS, ids=[d.name for d in DECLS])
def test_reference_and_fake_agree_on_outputs(decl):
    assert decl.reference is not None and decl.fake is not None, f"{decl.qualname}: register_fake missing"
    for args in samples_of(decl):
        real = _flat(decl.overload(*args))
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = _flat(decl.overload(*args))
        assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]
        assert all(torch.isfinite(t.float()).all() for t in real), f"{decl.qualname}: non-finite output"
        for t in real:
            if t.dtype == torch.int8:  # the outlier token sets its scale: its largest code is 127
                assert t.abs().amax().item() == 127
            if t.dtype == torch.float8_e4m3fn:  # ... and 448 for FP8 E4M3
                assert t.float().abs().amax().item() == 448


@pytest.mark.parametrize("decl", DECLS, ids=[d.name for d in DECLS])
def test_opcheck(decl):
    for args in samples_of(decl):
        # test_schema compares the inputs before and after with allclose, which torch lacks for FP8 on CPU
        fp8_in = any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args)
        utils = [u for u in torch.library._OPCHECK_DEFAULT_UTILS if not (fp8_in and u == "test_schema")]
        torch.library.opcheck(decl.overload, args, test_utils=utils)


def _same_parameters(a: Callable, b: Callable) -> bool:
    return list(inspect.signature(a).parameters) == list(inspect.signature(b).parameters)


def test_every_op_has_a_cuda_kernel_or_is_declared_reference_only():
    for decl in DECLS:
        if decl.cuda == "kernel":
            assert decl.cuda_kernel is not None, f"{decl.qualname}: add @cuda_kernel({decl.name!r}) in plugins/cuda.py"
            assert _same_parameters(decl.cuda_kernel, decl.reference), decl.qualname
        else:
            assert decl.cuda == "reference" and decl.cuda_kernel is None, decl.qualname
    # the QDQ forms are fused away before an engine runs; everything that runs on CUDA has a kernel, but for the
    # collectives, which torch.distributed runs (NCCL), and HERO's quantized attention (an option, no kernel yet)
    assert {d.name for d in DECLS if d.cuda == "reference"} == {d.name for d in DECLS
                                                                if d.category in ("qdq", "collective")} | {
                                                                    "quant_attention"}


def test_every_exported_op_has_both_onnx_dialects():
    standard, trt = translation_table("standard"), translation_table("tensorrt")
    for decl in (d for d in DECLS if d.exported):
        assert standard.get(decl.overload) is decl.translations["standard"], decl.qualname
        assert _same_parameters(decl.translations["standard"], decl.reference), decl.qualname
        if decl.tensorrt == "plugin":
            assert trt_spec.plugin_for(decl.name).zq_op == decl.name
            assert trt[decl.overload] is decl.translations["tensorrt"], decl.qualname
            assert _same_parameters(decl.translations["tensorrt"], decl.reference), decl.qualname
        else:  # TensorRT builds the standard ONNX ops natively
            assert decl.name not in trt_spec.PLUGINS and trt[decl.overload] is standard[decl.overload]
    trt_spec.check_declarations()
    assert set(standard) == set(trt) == set(OPS.values())


def test_runtime_only_ops_are_declared_so_and_have_no_lowering():
    runtime = [d for d in DECLS if not d.exported]
    assert {d.name for d in runtime} == set(GENERATION_OPS) == {"rope", "rope_kv_write", "gqa_attention", "all_reduce",
                                                                "quant_attention"}
    for decl in runtime:
        assert decl.translations == {} and decl.tensorrt is None and decl.name not in trt_spec.PLUGINS
        assert decl.overload not in translation_table("standard")


def test_the_dump_has_a_colour_for_every_category():
    assert set(registry.CATEGORIES) <= set(COLOURS)
    assert {d.category for d in DECLS} == set(registry.CATEGORIES)
