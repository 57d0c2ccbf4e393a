"""The TensorRT plugins' launch functions (plugins_cuda/tensorrt/zq_trt_kernels.h) are implemented on the kernel
library's C API: the adapter compiles against the CUDA and zq headers (no TensorRT needed), defines every
function the header declares, and runs its GEMMs through the library's dispatcher (zq_gemm_run) with the plan it
was given: it calls no GEMM kernel directly, so it cannot choose one."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CUDA_INCLUDE = Path("/usr/local/cuda/include")


@pytest.mark.skipif(shutil.which("g++") is None or shutil.which("nm") is None
                    or not (CUDA_INCLUDE / "cuda_runtime_api.h").is_file(), reason="needs g++, nm and CUDA headers")
def test_adapter_defines_every_declared_launch(tmp_path):
    trt = REPO / "plugins_cuda" / "tensorrt"
    obj = tmp_path / "adapters.o"
    r = subprocess.run(["g++", "-std=c++17", "-c", "-Wall", "-Wextra", "-Werror", "-I", str(trt),
                        "-I", str(REPO / "plugins_cuda" / "include"), "-I", str(CUDA_INCLUDE),
                        str(trt / "zq_trt_kernels.cpp"), "-o", str(obj)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    declared = set(re.findall(r"^\s*(?:cudaError_t|size_t|bool)\s+(\w+)\(", (trt / "zq_trt_kernels.h").read_text(),
                              re.M))
    assert len(declared) == 8
    symbols = subprocess.run(["nm", "-C", "--defined-only", str(obj)], capture_output=True, text=True).stdout
    defined = {name for name in declared if re.search(rf"\bzq::kernels::{name}\(", symbols)}
    assert defined == declared
    undefined = subprocess.run(["nm", "-u", str(obj)], capture_output=True, text=True).stdout
    for api in ("zq_quantize_per_token", "zq_norm_quant", "zq_act_quant", "zq_gemm_run", "zq_gemm_plan_parse",
                "zq_gemm_kernel_available", "zq_gemm_workspace_bytes"):
        assert api in undefined  # resolved by libzq_kernels.so, the engine's own kernels
    for kernel in ("zq_gemm_simt", "zq_gemm_mma", "zq_gemm_sm90", "zq_unpack_int4"):
        assert not re.search(rf"\b{kernel}\b", undefined), f"the adapter calls {kernel} itself"
