"""The CUDA kernel library builds with CMake where nvcc is installed (the CPU CI machines have it), and the
built library loads and answers its ABI queries without a GPU. To keep the check fast the device code is compiled
unoptimized (ZQ_CHECK_BUILD: every kernel still compiled and assembled: the test took 43 s instead of 251 s on
2 cores) and the CUTLASS Hopper GEMM is left out (set ZQ_BUILD_TEST_SM90=1 to include it: several minutes)."""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


class GemmPlan(ctypes.Structure):
    """zq_gemm_plan of plugins_cuda/include/zq/gemm.h (ZQ_GEMM_PLAN_MAX = 8)."""
    _fields_ = [("count", ctypes.c_int), ("max_m", ctypes.c_int64 * 8), ("kernel", ctypes.c_int * 8),
                ("fallback", ctypes.c_int * 8)]


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("cmake") is None, reason="needs nvcc and cmake")
def test_kernel_library_builds_and_loads(tmp_path):
    build = tmp_path / "build"
    sm90 = "ON" if os.environ.get("ZQ_BUILD_TEST_SM90") == "1" else "OFF"
    cfg = subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), f"-DZQ_WITH_SM90_GEMM={sm90}",
                          "-DZQ_GENERIC_ARCHS=90", "-DZQ_CHECK_BUILD=ON"], capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    jobs = str(os.cpu_count() or 2)
    b = subprocess.run(["cmake", "--build", str(build), "-j", jobs], capture_output=True, text=True)
    assert b.returncode == 0, b.stdout[-5000:] + b.stderr[-5000:]
    lib_path = build / "libzq_kernels.so"
    assert lib_path.is_file()
    lib = ctypes.CDLL(str(lib_path))
    abi = re.search(r"#define ZQ_ABI_VERSION (\d+)", (REPO / "plugins_cuda/include/zq/common.h").read_text())
    assert lib.zq_abi_version() == int(abi.group(1))
    from zqcompile.plugins import cuda
    assert cuda.ABI_VERSION == int(abi.group(1)), "the binding and the library disagree on the ABI version"
    assert lib.zq_has_sm90_gemm() == int(sm90 == "ON")
    assert lib.zq_gemm_mma_num_configs() > 0  # the sm_80+ tensor-core GEMM is always built
    for sym in ["zq_quantize_per_token", "zq_quantize_per_tensor", "zq_norm_quant", "zq_act_quant",
                "zq_quantize_per_token_fp8", "zq_norm_quant_fp8", "zq_act_quant_fp8",
                "zq_gemm_simt", "zq_gemm_sm90", "zq_gemm_mma", "zq_gemm_mma_config", "zq_gemm_skinny",
                "zq_gemm_skinny_config", "zq_gemm_skinny_num_configs", "zq_unpack_int4", "zq_unpack_int4_two_level",
                "zq_dequantize_weight", "zq_rope", "zq_rope_kv", "zq_decode_attention", "zq_decode_attention_split",
                "zq_decode_attention_splits", "zq_decode_attention_workspace_bytes", "zq_gemm_run",
                "zq_gemm_workspace_bytes", "zq_gemm_kernel_name", "zq_gemm_kernel_available", "zq_gemm_plan_parse", "zq_gemm_plan_find",
                "zq_set_row_split", "zq_set_pdl", "zq_set_gemm_prefetch", "zq_set_attention_merge",
                "zq_gemm_sm90_fp8", "zq_gemm_sm90_fp8_config", "zq_gemm_sm90_fp8_num_configs", "zq_gemm_wgmma",
                "zq_gemm_wgmma_config", "zq_gemm_wgmma_num_configs"]:
        assert hasattr(lib, sym), sym
    # split-L decode attention's host-side plan (no device here: 132 SMs assumed), through the binding's types
    cuda._bind(lib)
    assert (lib.zq_gemm_sm90_fp8_num_configs() > 0) == (sm90 == "ON")
    assert [lib.zq_gemm_kernel_name(i) for i in range(7)] == [b"simt", b"mma", b"sm90", b"skinny", b"sm90_fp8",
                                                              b"wgmma", None]
    assert lib.zq_gemm_wgmma_num_configs() == 3  # sm_90a code, always built
    plan = GemmPlan()
    assert lib.zq_gemm_plan_parse(b"64:sm90_fp8/sm90,inf:sm90_fp8", ctypes.byref(plan)) == 0
    assert (plan.count, list(plan.kernel[:2]), list(plan.fallback[:2])) == (2, [4, 4], [2, -1])
    assert lib.zq_decode_attention_splits(64, 32, 8, 128, 0) == 1  # 512 blocks already: no split, no combine
    assert lib.zq_decode_attention_splits(1, 32, 8, 4096, 0) == 64  # a long cache: 8 KV heads x 64 splits of 64
    assert lib.zq_decode_attention_splits(4, 32, 8, 2048, 0) == 16  # 32 pairs: 16 splits of 128 slots
    assert lib.zq_decode_attention_splits(16, 32, 8, 4096, 0) == 16  # 128 pairs: at least 16 splits
    assert lib.zq_decode_attention_splits(16, 32, 8, 512, 0) == 3  # a short cache: about two blocks an SM
    assert lib.zq_decode_attention_splits(1, 32, 8, 4096, -2) == 32  # the two-blocks rule alone (A/B)
    assert lib.zq_decode_attention_splits(3, 32, 8, 4097, 100000) == 257  # forced: 16-slot chunks
    assert lib.zq_decode_attention_splits(64, 32, 8, 65536, 0) == 64  # at most 1024 slots a split
    assert lib.zq_decode_attention_workspace_bytes(1, 32, 8, 4096, 128, 0) == 2 * 32 * 64 * 4 + 32 * 64 * 128 * 4
    assert lib.zq_decode_attention_workspace_bytes(64, 32, 8, 128, 128, 0) == 0


def test_every_kernel_waits_on_the_kernel_ahead_first():
    """Programmatic dependent launch (zq/launch.cuh) is correct only if every kernel of the library runs
    zq::pdl_begin() (griddepcontrol.wait) before anything else, on every path, and every launch goes through
    zq::launch / zq::launch_cluster (which set the attribute): checked on the sources."""
    sources = sorted((REPO / "plugins_cuda").rglob("*.cu")) + sorted((REPO / "plugins_cuda").rglob("*.cuh"))
    kernels = 0
    for path in sources:
        text = path.read_text()
        for m in re.finditer(r"__global__", text):
            body = text.index("{", m.end())
            first = text[body + 1:].lstrip().split("\n", 1)[0]
            line = text.count("\n", 0, m.start()) + 1
            # pdl_begin(L2Prefetch): an L2 prefetch of the kernel's own reads, then the same wait
            assert first == "zq::pdl_begin();" or first.startswith("zq::pdl_begin(weight_rows("), \
                f"{path.name}:{line}: the kernel starts with {first!r}"
            kernels += 1
        if path.name != "launch.cuh":
            assert "<<<" not in text, f"{path.name}: a kernel launched with <<<>>> (use zq::launch)"
            assert "cudaLaunchKernelEx" not in text, f"{path.name}: a direct cudaLaunchKernelEx (use zq::launch)"
    assert kernels >= 18
