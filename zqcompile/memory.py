"""Peak memory of a block of work (compile), host and GPU, for the report.

Host: the process's peak resident set (Linux VmHWM), reset at the start where the kernel allows it
(/proc/self/clear_refs), else the process's lifetime peak (the record says which). GPU: the peak of
torch's CUDA allocator over the block, above what was allocated when it began (the model itself).
LiveBytes counts the tensors a streamed compile loads and derives while they live (its transient weights).
"""
from __future__ import annotations

import weakref
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


class LiveBytes:
    """Bytes of the tensors handed to `track` that are still alive, and the most that ever were at once
    (a streamed compile's transient float weights: what it loaded and derived, until they are dropped).
    `keep` takes a tensor out of the count for good (it became part of the engine)."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._alive: dict[int, tuple[object, int]] = {}  # id -> (finalizer, bytes)

    def track(self, t) -> None:
        if id(t) in self._alive:
            return
        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        self._alive[id(t)] = (weakref.finalize(t, self._freed, id(t)), n)

    def keep(self, t) -> None:
        fin, n = self._alive.pop(id(t), (None, 0))
        if fin is not None:
            fin.detach()
            self.live -= n

    def _freed(self, key: int) -> None:
        self.live -= self._alive.pop(key)[1]
