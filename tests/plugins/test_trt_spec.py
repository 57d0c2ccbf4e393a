"""The TensorRT plugin contract: one spec (zqcompile/plugins/trt_spec.py) -> ONNX schemas, exporter attributes
and the C++ field header must agree; the plugin sources compile against TensorRT headers when present."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from zqcompile.ops import OPS
from zqcompile.plugins import trt_spec

ROOT = Path(__file__).resolve().parents[2]
TRT_DIR = ROOT / "plugins_cuda" / "tensorrt"


def test_generated_header_matches_spec():
    assert (TRT_DIR / "zq_trt_fields.h").read_text() == trt_spec.cpp_header(), \
        "regenerate: python -m zqcompile.plugins.trt_spec > plugins_cuda/tensorrt/zq_trt_fields.h"


def test_every_plugin_wraps_a_zq_op_and_has_unique_fields():
    for op, spec in trt_spec.PLUGINS.items():
        assert op in OPS
        assert len(set(spec.field_names)) == len(spec.field_names)
        flags = {p.optional_flag for p in spec.inputs + spec.outputs if p.optional_flag}
        assert flags <= set(spec.field_names), (spec.name, flags)
        assert all(trt_spec.FIELD_TYPES[f.type] for f in spec.fields)


def test_check_attributes_rejects_drift():
    spec = trt_spec.PLUGINS["int8_gemm_dequant"]
    good = dict(act="gelu", w_bits=8, out_dtype=1, has_bias=1, has_residual=0, kernel_plan="inf:simt")
    trt_spec.check_attributes(spec, good)
    with pytest.raises(ValueError, match="plugin fields"):
        trt_spec.check_attributes(spec, {**good, "extra": 1})
    with pytest.raises(TypeError, match="w_bits"):
        trt_spec.check_attributes(spec, {**good, "w_bits": 8.0})


def test_onnx_schemas_register():
    import onnx.defs
    trt_spec.register_onnx_schemas()
    for spec in trt_spec.PLUGINS.values():
        schema = onnx.defs.get_schema(spec.name, trt_spec.DOMAIN_VERSION, trt_spec.DOMAIN)
        assert sorted(schema.attributes) == sorted(spec.field_names)
        assert [i.name for i in schema.inputs] == [p.name for p in spec.inputs]


def _tensorrt_include() -> Path | None:
    for cand in [os.environ.get("TENSORRT_ROOT", ""), "/usr", "/usr/local/tensorrt", "/opt/tensorrt"]:
        if cand and (Path(cand) / "include" / "NvInferRuntime.h").is_file():
            return Path(cand) / "include"
    return None


def _cuda_include() -> Path | None:
    for cand in [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]:
        if cand and (Path(cand) / "include" / "cuda_runtime_api.h").is_file():
            return Path(cand) / "include"
    return None


@pytest.mark.skipif(_tensorrt_include() is None or _cuda_include() is None or shutil.which("g++") is None,
                    reason="TensorRT headers (set TENSORRT_ROOT) or CUDA headers not found")
def test_plugin_sources_compile_against_tensorrt_headers():
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-Wno-deprecated-declarations",
           "-isystem", str(_tensorrt_include()), "-isystem", str(_cuda_include()), str(TRT_DIR / "zq_trt_plugin.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_turns_plugins_off_without_tensorrt(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TENSORRT_ROOT"}
    res = subprocess.run(["cmake", "-S", str(TRT_DIR), "-B", str(tmp_path / "b"), "-DTENSORRT_ROOT=" + str(tmp_path)],
                         capture_output=True, text=True, env=env)
    if _tensorrt_include() is not None:
        pytest.skip("TensorRT headers are installed on this machine")
    assert res.returncode == 0, res.stderr
    assert "zq TensorRT plugins: OFF" in res.stdout
