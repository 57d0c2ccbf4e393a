"""End to end: tiny random-init BERT / GPT-2 / OPT (hidden 64, 2 layers), quantized, exported to the standard
dialect with dynamic batch/seq, run in ONNX Runtime CPU at another shape and compared with the engine.

"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import zqcompile as zq
from zqcompile.export.onnx import export_onnx

from zqcompile.models import tiny_model
from onnx_helpers import run_ort

# W8A8 and W4/8A8 on every family, every preset on GPT-2 (the CI time budget keeps the grid at that)
CASES = [(a, p) for a in ("bert", "gpt2", "opt") for p in ("w8a8", "w4/8a8")] + [
    ("gpt2", p) for p in ("w4/8a16", "w8a8/16", "w8a16", "ptq-static", "none")]


def _engine(arch: str, preset: str, ids: torch.Tensor):
    return zq.compile(tiny_model(arch), (ids,), config=preset, generation=False)  # ONNX exports the forward


def _as_numpy(out) -> np.ndarray:
    out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", getattr(out, "last_hidden_state", out))
    return out.detach().float().numpy()


@pytest.mark.parametrize("arch,preset", CASES)
def test_onnx_runtime_matches_engine(tmp_path, arch, preset):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    engine = _engine(arch, preset, ids)
    path = export_onnx(engine, tmp_path / f"{arch}.onnx")
    ids2 = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(1))
    got = run_ort(path, (ids2,))[0]
    ref = _as_numpy(engine(ids2))
    assert got.shape == ref.shape
    # every quantize/GEMM is bit-exact or within an ulp; LayerNorm/GELU ulps may flip one INT8 step in a few
    # activations, which moves an output by ~scale/127: bounded well below the quantization error itself
    err = np.abs(got - ref).max()
    assert err <= 1e-4 * max(1.0, np.abs(ref).max()), (err, np.abs(ref).max())
