"""Peak memory of a block of work (compile), host and GPU, for the report.

Host: the process's peak resident set (Linux VmHWM), reset at the start where the kernel allows it
(/proc/self/clear_refs), else the process's lifetime peak (the record says which). GPU: the peak of
torch's CUDA allocator over the block, above what was allocated when it began (the model itself).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_host_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


@contextmanager
def peak_memory() -> Iterator[dict]:
    """Yields a dict filled at the end: host_peak_bytes, host_peak_scope ("compile" | "process"),
    gpu_peak_above_start_bytes (only where CUDA is initialised)."""
    import torch
    out: dict = {}
    scope = "compile" if _reset_host_peak() else "process"
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    yield out
    hwm = _vm_hwm()
    if hwm is not None:
        out.update(host_peak_bytes=hwm, host_peak_scope=scope)
    if cuda:
        out["gpu_peak_above_start_bytes"] = torch.cuda.max_memory_allocated() - start
