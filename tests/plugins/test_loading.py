"""Loading the CUDA library: a clear, single warning on a CUDA device without it; silence on CPU; an older
library without the attention kernels still binds."""
from __future__ import annotations

import warnings

import pytest

from zqcompile import plugins


@pytest.fixture
def no_library(monkeypatch, tmp_path):
    monkeypatch.setattr(plugins, "candidate_paths", lambda: [tmp_path / plugins.LIBRARY_NAME])
    monkeypatch.setattr(plugins, "_state", {"loaded": None, "warned": False, "error": None})


def test_missing_library_warns_once_on_cuda(no_library):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert plugins.ensure_cuda_kernels("cuda") is False
        assert plugins.ensure_cuda_kernels("cuda:0") is False
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1
    assert "cmake -S . -B build" in msgs[0] and "reference implementations" in msgs[0]
    assert "not loaded" in plugins.status()


def test_missing_library_is_silent_on_cpu(no_library):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert plugins.ensure_cuda_kernels("cpu") is False
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_kernel_fallback_is_counted_and_warned_once(monkeypatch):
    """A CUDA input no kernel covers runs the reference op: counted per (op, reason), one warning per pair."""
    from zqcompile.plugins import cuda

    monkeypatch.setattr(cuda, "fallbacks", cuda.Counter())
    monkeypatch.setattr(cuda, "_ref", lambda op: (lambda *a: (op, a)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cuda._fallback("norm_quant", "mixed dtypes", 1, 2) == ("norm_quant", (1, 2))
        cuda._fallback("norm_quant", "mixed dtypes", 3)
        cuda._fallback("act_quant", "rows over 56K", 4)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 2 and "norm_quant ran its reference implementation (mixed dtypes)" in msgs[0]
    assert cuda.fallbacks == {("norm_quant", "mixed dtypes"): 2, ("act_quant", "rows over 56K"): 1}
