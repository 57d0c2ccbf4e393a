"""The Hopper FP8 GEMM kernel (sm90_fp8) on the CPU side: the chooser takes it unless ZQ_GEMM_SM90_FP8=0, on
sm_90 with the Hopper library, fp16 / bf16 out, K and N multiples of 16, never for TensorRT; the plan records it,
with scaled_mm as its fallback; the binding's mirrors of the C API (zq_gemm_args's layout, the zq_dtype and kernel
ids, the ABI version) match the headers; a built library declines what the kernel's contract leaves out without
touching a device. Its numerics on an H200: tests/gpu/test_fp8_gemm_sm90.py."""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zqcompile.plugins import gemm_kernels as G

REPO = Path(__file__).resolve().parents[2]
INCLUDE = REPO / "plugins_cuda" / "include" / "zq"
CUDA_INCLUDE = Path("/usr/local/cuda/include")
H200 = G.GemmDevice("cuda:0 NVIDIA H200", (9, 0), library=True, sm90_library=True)
P = G.GemmProblem("fp8_gemm_dequant", 4096, 4096, 8, 0, "float8_e4m3fn", "bfloat16", "bfloat16", None)
NOT_SUPPORTED = 801


def test_sm90_fp8_is_on_by_default_at_every_m_and_scaled_mm_when_off():
    assert G.SM90_FP8_MODE == "1" and G.KERNELS.index(G.SM90_FP8) == G.KERNELS.index(G.SCALED_MM) - 1
    for lo, _ in G.M_BUCKETS:  # decode M: the decode kernel first, the Hopper FP8 kernel its fallback; N = 4096
        c = G.choose_gemm(G.replace(P, m=lo), H200)  # is within the decode kernel's row-scale limit up to M = 32
        want = (G.SKINNY, G.SM90_FP8) if lo <= G.SKINNY_INT8_MID_M else (G.SM90_FP8, G.SCALED_MM)
        assert (c.kernel, c.fallback) == want, c
    big = G.replace(P, m=256)
    assert G.choose_gemm(G.replace(big, out_dtype="float16", bias_dtype="float16"), H200).kernel is G.SM90_FP8
    with G.sm90_fp8_mode("0"):
        c = G.choose_gemm(big, H200)
        assert c.kernel is G.SCALED_MM
        assert c.reason("sm90_fp8") == "policy: turned off (ZQ_GEMM_SM90_FP8=0)"
        assert G.choose_gemm(P, H200).fallback is G.SCALED_MM  # the decode kernel's fallback
    assert G.SM90_FP8_MODE == "1" and G.choose_gemm(big, H200).kernel is G.SM90_FP8


@pytest.mark.parametrize("change,device,kernel,reason", [
    (dict(out_dtype="float32", bias_dtype="float32"), H200, "scaled_mm", "float32 output: its epilogue writes fp16"),
    (dict(n=4104), H200, "reference", "needs K % 16 == 0 and N % 16 == 0"),
    (dict(k=4104), H200, "reference", "needs K % 16 == 0 and N % 16 == 0"),
    (dict(bias_dtype="float32"), H200, "scaled_mm", "bias / residual dtype differs from the output dtype"),
    ({}, G.replace(H200, sm90_library=False), "scaled_mm", "the kernel library was built without it"),
    ({}, G.replace(H200, capability=(8, 9)), "reference", "needs compute capability 9.0"),
    ({}, G.CPU, "reference", "not a CUDA device"),
    (dict(op="int8_gemm_dequant", x_dtype="int8", out_dtype="float16", bias_dtype=None), H200, "sm90",
     "FP8 x FP8 only"),
])
def test_sm90_fp8_contract_when_on(change, device, kernel, reason):
    p = G.replace(P, m=256, **change)
    with G.sm90_fp8_mode("1"):
        assert G.choose_gemm(p, device).kernel.name == kernel
        assert G.SM90_FP8.can_implement(p, device).startswith(reason)


def test_tensorrt_declines_sm90_fp8_in_one_line():
    trt = G.replace(H200, tensorrt=True)
    with G.sm90_fp8_mode("1"):
        with pytest.raises(G.NoGemmKernel) as e:
            G.choose_gemm(P, trt)
    why = G.SM90_FP8.can_implement(P, trt)
    assert "\n" not in why and why.startswith("the TensorRT dialect exports FP8 GEMMs as standard ONNX")
    assert f"sm90_fp8: {why}" in str(e.value)


def test_plan_and_report_name_sm90_fp8_when_on():
    """An fp8 engine planned for an H200 (the kernel on, the default) records sm90_fp8 in every M bucket (scaled_mm
    the fallback) and report() shows it; with it off, scaled_mm and the reason sm90_fp8 was skipped."""
    import torch

    import zqcompile as zq
    from tests._tiny import tiny_llama
    from zqcompile.plugins.gemm_plan import plan_gemm, plan_record

    engine = zq.compile(tiny_llama(), (torch.randint(0, 128, (1, 8)),), "fp8", generation=False)
    gemms = [g for g in engine.record.gemms if g.get("problem", {}).get("op") == "fp8_gemm_dequant"]
    assert gemms
    for g in gemms:  # as compiled from a bf16 model (the kernel's epilogue writes fp16 / bf16)
        g["problem"].update(out_dtype="bfloat16", bias_dtype=None)
    with G.sm90_fp8_mode("1"):
        plan_record(engine.record, H200)
        text = engine.report()
    plan = gemms[0]["kernels"]
    assert set(plan["buckets"].values()) == {"sm90_fp8"} and set(plan["fallbacks"].values()) == {"scaled_mm"}
    assert plan["tensorrt_plan"].startswith("none: ")  # no FP8 plugin: the TensorRT dialect lowers FP8 to ONNX
    row = next(line for line in text[text.index("Kernels per M bucket"):].splitlines()
               if line.startswith(gemms[0]["fqn"]))
    assert row.split().count("sm90_fp8") == len(G.M_BUCKETS), row
    with G.sm90_fp8_mode("0"):
        off = plan_gemm(G.GemmProblem(**gemms[0]["problem"]), H200)
    assert set(off["buckets"].values()) == {"scaled_mm"}
    assert all(s["sm90_fp8"] == "policy: turned off (ZQ_GEMM_SM90_FP8=0)" for s in off["skipped"].values())


def test_env_turns_it_off_and_a_bad_value_fails_in_one_line():
    code = ("from zqcompile.plugins import gemm_kernels as G; d = G.GemmDevice('h', (9, 0), True, True); "
            "print(G.SM90_FP8_MODE, G.choose_gemm(G.GemmProblem('fp8_gemm_dequant', 64, 64, 8, 0, 'float8_e4m3fn', "
            "'float16'), d).kernel.name)")
    for mode, kernel in (("0", "scaled_mm"), ("1", "sm90_fp8")):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "ZQ_GEMM_SM90_FP8": mode})
        assert r.returncode == 0 and r.stdout.split() == [mode, kernel], r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", "import zqcompile.plugins.gemm_kernels"], capture_output=True,
                       text=True, env={**os.environ, "ZQ_GEMM_SM90_FP8": "yes"})
    assert r.returncode != 0 and "ZQ_GEMM_SM90_FP8 must be 0 or 1" in r.stderr and "'yes'" in r.stderr
    with pytest.raises(ValueError, match="sm90_fp8_mode must be 0 or 1"):
        with G.sm90_fp8_mode("on"):
            pass


# ---- the binding's mirrors of the headers -----------------------------------------------------------------------
def _header_fields() -> list[str]:
    body = re.search(r"typedef struct \{(.*?)\} zq_gemm_args;", (INCLUDE / "gemm.h").read_text(), re.S).group(1)
    return [name for decl in body.split(";") if decl.strip() for name in re.findall(r"(\w+)\s*(?:,|$)", decl.strip())]


def test_binding_mirrors_the_headers():
    from zqcompile.plugins import cuda, cuda_gemm
    assert [f for f, _ in cuda_gemm.GemmArgs._fields_] == _header_fields()
    common = (INCLUDE / "common.h").read_text()
    assert cuda.ABI_VERSION == int(re.search(r"#define ZQ_ABI_VERSION (\d+)", common).group(1))
    dtypes = dict(re.findall(r"ZQ_(F32|F16|BF16|FP8_E4M3) = (\d+)", common))
    assert {str(k).removeprefix("torch."): v for k, v in cuda.DTYPES.items()} == {
        "float32": int(dtypes["F32"]), "float16": int(dtypes["F16"]), "bfloat16": int(dtypes["BF16"])}
    assert cuda.FP8_E4M3 == int(dtypes["FP8_E4M3"]) == 3
    ids = {k.lower(): int(v) for k, v in re.findall(r"ZQ_GEMM_(\w+) = (\d+)", (INCLUDE / "gemm.h").read_text())}
    assert ids.pop("num_kernels") == 6
    assert ids == {k.name: k.c_id for k in G.KERNELS if k.c_id is not None}
    names = re.search(r"kNames\[ZQ_GEMM_NUM_KERNELS\] = \{(.*?)\};",
                      (REPO / "plugins_cuda/src/gemm_dispatch.cu").read_text()).group(1)
    assert re.findall(r'"(\w+)"', names) == sorted(ids, key=ids.get)


@pytest.mark.skipif(shutil.which("g++") is None or not (CUDA_INCLUDE / "cuda_runtime_api.h").is_file(),
                    reason="needs g++ and the CUDA headers")
def test_gemm_args_layout_matches_the_header(tmp_path):
    """offsetof / sizeof of zq_gemm_args as g++ lays the header out, against the ctypes Structure."""
    from zqcompile.plugins.cuda_gemm import GemmArgs
    fields = [f for f, _ in GemmArgs._fields_]
    src = tmp_path / "layout.cpp"
    src.write_text('#include <cstddef>\n#include <cstdio>\n#include "zq/gemm.h"\nint main() {\n'
                   + "".join(f'  std::printf("{f} %zu\\n", offsetof(zq_gemm_args, {f}));\n' for f in fields)
                   + '  std::printf("sizeof %zu\\n", sizeof(zq_gemm_args));\n}\n')
    exe = tmp_path / "layout"
    r = subprocess.run(["g++", "-std=c++17", "-I", str(INCLUDE.parent), "-I", str(CUDA_INCLUDE), str(src), "-o",
                        str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    got = dict(line.split() for line in subprocess.run([str(exe)], capture_output=True, text=True).stdout.splitlines())
    want = {f: getattr(GemmArgs, f).offset for f in fields}
    assert {k: int(v) for k, v in got.items()} == {**want, "sizeof": ctypes.sizeof(GemmArgs)}


# ---- a built library with the Hopper GEMMs: the contract's declines are host code --------------------------------
def _sm90_library():
    from zqcompile import plugins
    path = plugins.library_path()
    if path is None:
        pytest.skip("no libzq_kernels.so (build it, or point ZQ_CUDA_LIB at one)")
    lib = ctypes.CDLL(str(path))
    from zqcompile.plugins import cuda
    if lib.zq_abi_version() != cuda.ABI_VERSION or not lib.zq_has_sm90_gemm():
        pytest.skip(f"{path}: not an ABI {cuda.ABI_VERSION} library with the Hopper GEMMs")
    cuda._bind(lib)
    return lib


def _fp8_args(**change):
    from zqcompile.plugins import cuda
    from zqcompile.plugins.cuda_gemm import GemmArgs
    a = dict(x=0x10000, x_dt=cuda.FP8_E4M3, x_is_int8=0, x_scale=0x20000, wq=0x30000, w_bits=8, w_fp8=1,
             w_scale=0x40000, groups=1, bias=0x50000, residual=None, act=0, out=0x60000, out_dt=2, m=130, n=1024,
             k=4096)
    a.update(change)
    return GemmArgs(**a)


@pytest.mark.parametrize("change", [dict(x=0x10001), dict(wq=0x30008), dict(out=0x60002), dict(residual=0x70004),
                                    dict(bias=0x50001), dict(x_scale=None), dict(w_scale=None), dict(n=1000),
                                    dict(k=4104), dict(groups=2), dict(out_dt=0), dict(w_fp8=0), dict(x_is_int8=1),
                                    dict(x_dt=1), dict(w_bits=4), dict(m=1 << 31)])
def test_library_declines_outside_the_fp8_contract_without_a_device(change):
    lib = _sm90_library()
    for cfg in (-1, 0):
        assert lib.zq_gemm_sm90_fp8_config(ctypes.byref(_fp8_args(**change)), cfg, None) == NOT_SUPPORTED


def test_library_dispatch_keeps_fp8_and_integer_operands_apart():
    lib = _sm90_library()
    assert lib.zq_gemm_kernel_name(4) == b"sm90_fp8" and lib.zq_gemm_kernel_name(6) is None
    assert lib.zq_gemm_sm90_fp8_num_configs() == 3
    fp8, int8 = _fp8_args(), _fp8_args(x_dt=0, x_is_int8=1, w_fp8=0)
    for kernel in (0, 1, 2, 3, 5):  # simt, mma, sm90, skinny, wgmma never read FP8 codes
        assert lib.zq_gemm_run(kernel, ctypes.byref(fp8), None, 0, None) == NOT_SUPPORTED
    assert lib.zq_gemm_run(4, ctypes.byref(int8), None, 0, None) == NOT_SUPPORTED
    assert lib.zq_gemm_sm90_config(ctypes.byref(fp8), -1, None) == NOT_SUPPORTED
    for change in (dict(out=0x60002), dict(x_scale=None), dict(x=0x10004)):  # the INT8 kernel's new declines
        assert lib.zq_gemm_sm90_config(ctypes.byref(_fp8_args(x_dt=0, x_is_int8=1, w_fp8=0, **change)), -1,
                                       None) == NOT_SUPPORTED
    if not _has_cuda():  # inside the contract: on to the device, which this machine lacks
        assert lib.zq_gemm_sm90_fp8_config(ctypes.byref(fp8), 0, None) not in (0, NOT_SUPPORTED)
    assert lib.zq_gemm_sm90_fp8_config(ctypes.byref(_fp8_args(m=0)), 0, None) == 0  # nothing to do


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _int_args(**change):
    from zqcompile.plugins.cuda_gemm import GemmArgs
    a = dict(x=0x10000, x_dt=0, x_is_int8=1, x_scale=0x20000, wq=0x30000, w_bits=4, w_fp8=0, w_scale=0x40000,
             groups=32, bias=None, residual=None, act=0, out=0x60000, out_dt=1, m=2048, n=1024, k=4096)
    a.update(change)
    return GemmArgs(**a)


@pytest.mark.parametrize("change", [dict(x=0x10008), dict(wq=0x30004), dict(out=0x60002), dict(residual=0x70002),
                                    dict(x_scale=None), dict(w_scale=None), dict(n=1000), dict(n=1088), dict(k=4160),
                                    dict(groups=64), dict(groups=3), dict(out_dt=0), dict(x_is_int8=0), dict(w_bits=2),
                                    dict(w_fp8=1), dict(k=131072, groups=1), dict(m=65535 * 64 + 1)])
def test_wgmma_declines_outside_its_contract_without_a_device(change):
    """zq_gemm_wgmma's contract (gemm.h) is checked on the host before any device call: each violation returns
    cudaErrorNotSupported for every configuration, here on a machine without a GPU. K groups of 64 (groups=64 at
    K = 4096) and N not a multiple of 128 are among them."""
    lib = _sm90_library()
    for cfg in (-1, 0, 1, 2):
        assert lib.zq_gemm_wgmma_config(ctypes.byref(_int_args(**change)), cfg, None) == NOT_SUPPORTED, change
