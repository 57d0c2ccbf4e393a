"""Run a graph under CUDA graphs: one CUDA graph per input bucket, captured on first use and replayed after.
Small-batch transformer inference is launch-bound on a fast GPU (docs/facts.md: BERT-base batch 1 spends more
time launching than computing; decode replays every GEMM, norm and attention launch of a step as one graph).

One runner, two ways of bucketing its inputs:
- `ShapeBucketedGraphs` (engine calls, prefill): one graph per exact (shape, dtype, device) of the inputs, up
  to `max_graphs` (past that, a new shape each call would only cost memory: eager).
- `BatchBucketedGraphs` (decode): one graph per batch bucket; a smaller batch is padded with zero rows (with an
  all-zero kv_mask they attend only to themselves) and its outputs are cut back to the batch.

Aliasing contract (what a caller may do with the outputs):
- inputs are copied into the graph's static buffers, so the caller's tensors are never captured;
- tensors the graph reads or writes in place that are not inputs (the KV cache) are the graph module's own
  buffers, the same tensors eager calls use: a replay updates them exactly as an eager call would;
- `clone_outputs=True` (the default; the engine's public outputs): outputs are cloned out of the graph's pool, so
  callers may keep them; `False` (the decode loop): outputs are views of the graph's static memory, valid until
  the next call of any graph of this runner (all share one memory pool).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils._pytree import tree_map

_Entry = tuple[torch.cuda.CUDAGraph, list[torch.Tensor], object]
_side_streams: dict[int, torch.cuda.Stream] = {}


def side_stream(device: torch.device | None = None) -> torch.cuda.Stream:
    """The one stream per device that captures warm up on. One, not one per capture: cuBLAS keeps a workspace
    (tens of MiB) for every stream it has run on, for the life of the process."""
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(index)
    return _side_streams[index]


class _GraphRunner:
    """Capture and replay of `fn` per bucket key; the subclasses say what a key is and how inputs fit its buffers."""

    def __init__(self, fn: Callable, warmup: int = 2, clone_outputs: bool = True):
        self.fn = fn
        self.warmup = warmup
        self.clone_outputs = clone_outputs
        self.graphs: dict[object, _Entry] = {}
        self.pool = None  # one memory pool for every graph of the runner

    def _capture(self, static: list[torch.Tensor]) -> _Entry:
        side = side_stream(static[0].device if static else None)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(self.warmup):  # library handles and workspaces are created outside the capture
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.no_grad():
            out = self.fn(*static)
        self.pool = graph.pool()
        return graph, static, out

    def _replay(self, entry: _Entry, copy_in: Callable[[list[torch.Tensor]], None]):
        graph, static, out = entry
        copy_in(static)
        graph.replay()
        return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, out) if self.clone_outputs else out


class ShapeBucketedGraphs(_GraphRunner):
    def __init__(self, fn: Callable, warmup: int = 2, max_graphs: int = 32, clone_outputs: bool = True):
        super().__init__(fn, warmup, clone_outputs)
        self.max_graphs = max_graphs

    @staticmethod
    def key(tensors: Sequence[torch.Tensor]) -> tuple:
        return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)

    def __call__(self, *tensors: torch.Tensor):
        k = self.key(tensors)
        entry = self.graphs.get(k)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                with torch.no_grad():
                    return self.fn(*tensors)
            entry = self.graphs[k] = self._capture([t.clone() for t in tensors])

        def copy_in(static):
            for s, t in zip(static, tensors):
                s.copy_(t)
        return self._replay(entry, copy_in)


class BatchBucketedGraphs(_GraphRunner):
    """Inputs with a leading batch dim, except those at `unbatched` (e.g. the cache position), padded to the
    smallest bucket >= the batch; the first output's rows past the batch are dropped. Padded rows start as zeros;
    those of the inputs at `zero_padding` (the kv_mask, which keeps them out of attention) are zeroed again on
    every call with a smaller batch, the others keep whatever an earlier call left (their outputs are dropped)."""

    def __init__(self, fn: Callable, buckets: Sequence[int], unbatched: Sequence[int] = (),
                 zero_padding: Sequence[int] = (), warmup: int = 2, clone_outputs: bool = False):
        super().__init__(fn, warmup, clone_outputs)
        self.buckets = tuple(buckets)
        self.unbatched = frozenset(unbatched)
        self.zero_padding = frozenset(zero_padding)

    def bucket_for(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        raise ValueError(f"batch {batch} is larger than the largest decode bucket {self.buckets[-1]}")

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        batch = tensors[0].shape[0]
        bucket = self.bucket_for(batch)
        entry = self.graphs.get(bucket)
        if entry is None:
            entry = self.graphs[bucket] = self._capture(
                [t.clone() if i in self.unbatched or not t.dim() else pad_rows(t, bucket) for i, t in enumerate(tensors)])

        def copy_in(static):
            for i, (s, t) in enumerate(zip(static, tensors)):
                if i in self.unbatched or not t.dim():
                    s.copy_(t)
                else:
                    s[:batch].copy_(t)
                    if batch < bucket and i in self.zero_padding:
                        s[batch:].zero_()
        return self._replay(entry, copy_in)[:batch]


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t with its batch dim grown to `rows` (zeros appended); a copy even when no rows are added."""
    if t.shape[0] == rows:
        return t.clone()
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])
