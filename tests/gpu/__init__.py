"""GPU tests (marked `gpu`): they skip cleanly on machines without CUDA or without the kernel library."""
from __future__ import annotations

import pytest
import torch


def require_cuda(kernels: bool = True) -> None:
    """Skip the calling test module without a CUDA GPU, or (kernels=True) without libzq_kernels.so."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU", allow_module_level=True)
    if kernels:
        from zqcompile import plugins
        if not plugins.load():
            pytest.skip(f"CUDA kernel library not built: {plugins.status()}", allow_module_level=True)
