"""Plugins: loading and binding compiled native code (the CUDA op library here, the TensorRT plugin spec in
trt_spec.py). Loading the compiled CUDA kernel library (plugins_cuda/, built with CMake) registers its kernels as
the CUDA implementations of the zq ops (zqcompile/plugins/cuda.py).

`load()` is idempotent and cheap after the first call. Without the library the zq ops keep running their
reference implementations (plain torch, correct but slow); `ensure_cuda_kernels(device)` says so once, with
the command that builds the library, when a model is run on a CUDA device.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import torch

LIBRARY_NAME = "libzq_kernels.so"
ENV_VAR = "ZQ_CUDA_LIB"
BUILD_HINT = "cmake -S . -B build && cmake --build build -j   (in the zqcompile source tree)"

_state: dict = {"loaded": None, "warned": False, "error": None}


def candidate_paths() -> list[Path]:
    """Where the library is looked for, in order: $ZQ_CUDA_LIB, the package folder, <repo>/build."""
    paths = []
    if os.environ.get(ENV_VAR):
        paths.append(Path(os.environ[ENV_VAR]))
    here = Path(__file__).resolve().parent
    paths.append(here / LIBRARY_NAME)
    repo = here.parent.parent
    paths += [repo / "build" / LIBRARY_NAME, repo / "build" / "plugins_cuda" / LIBRARY_NAME]
    return paths


def library_path() -> Optional[Path]:
    return next((p for p in candidate_paths() if p.is_file()), None)


def load() -> bool:
    """Register the CUDA kernels of the zq ops if the library is built; True when they are registered."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    path = library_path()
    if path is None:
        _state["loaded"] = False
        _state["error"] = f"{LIBRARY_NAME} not found (looked in: {', '.join(map(str, candidate_paths()))})"
        return False
    from zqcompile.plugins import cuda  # imports ctypes bindings only when a library exists

    try:
        cuda.register(path)
    except OSError as e:  # a library built for another platform / missing CUDA driver
        _state["loaded"] = False
        _state["error"] = f"could not load {path}: {e}"
        return False
    _state["loaded"] = True
    return True


def status() -> str:
    """One line for reports: which implementation the zq ops run on CUDA devices."""
    if load():
        from zqcompile.plugins import cuda

        return f"zq CUDA kernels: {cuda.describe()}"
    return f"zq CUDA kernels: not loaded ({_state['error']}); zq ops run their reference implementations"


def kernel_fallbacks() -> dict[tuple[str, str], int]:
    """(op, reason) -> calls of this process that ran a slower path than the planned kernel (the reference
    implementation, or a GEMM kernel's fallback); empty when the CUDA kernels never loaded."""
    import sys
    cuda = sys.modules.get("zqcompile.plugins.cuda")
    return dict(cuda.fallbacks) if cuda is not None else {}


def ensure_cuda_kernels(device: torch.device | str) -> bool:
    """Load the kernels for a model about to run on `device`; warn once if it is a CUDA device without them."""
    ok = load()
    if not ok and torch.device(device).type == "cuda" and not _state["warned"]:
        _state["warned"] = True
        warnings.warn(f"zqcompile: the CUDA kernel library is not available ({_state['error']}). The quantized "
                      f"ops run their slow reference implementations on the GPU. Build it with: {BUILD_HINT}, "
                      f"or point ${ENV_VAR} at {LIBRARY_NAME}.", RuntimeWarning, stacklevel=2)
    return ok
