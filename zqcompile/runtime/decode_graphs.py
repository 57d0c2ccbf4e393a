"""Decode under CUDA graphs: one graph per batch bucket, captured on first use, replayed every token.

The decode GraphModule has static shapes per bucket (one token per row, a fixed-size cache), so a bucket's
whole step - every GEMM, norm and attention launch - replays as one graph: small-batch decode is launch-bound
otherwise (FACTS.md). Inputs are copied into the graph's static buffers; the KV cache buffers are the same
tensors the prefill graph writes, so no copy is needed for them. A batch smaller than its bucket is padded
with rows whose kv_mask is all zero (they attend only to themselves and their outputs are dropped).
"""
from __future__ import annotations

from typing import Callable

import torch


class CudaGraphDecode:
    def __init__(self, step: Callable[..., torch.Tensor], buckets: tuple[int, ...], warmup: int = 2):
        self.step = step
        self.buckets = buckets
        self.warmup = warmup
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self.pool = None

    def bucket_for(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        raise ValueError(f"batch {batch} is larger than the largest decode bucket {self.buckets[-1]}")

    def _capture(self, bucket: int, like: tuple[torch.Tensor, ...]) -> None:
        static = tuple(pad_rows(t, bucket) if t.dim() and i != 2 else t.clone() for i, t in enumerate(like))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(self.warmup):  # lazy init (cuBLAS handles, workspaces) must happen outside capture
                self.step(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.no_grad():
            out = self.step(*static)
        self.pool = graph.pool()  # buckets share one memory pool
        self.graphs[bucket] = (graph, static, out)

    def __call__(self, ids, pos, cache_position, kv_mask) -> torch.Tensor:
        batch = ids.shape[0]
        bucket = self.bucket_for(batch)
        if bucket not in self.graphs:
            self._capture(bucket, (ids, pos, cache_position, kv_mask))
        graph, (s_ids, s_pos, s_cpos, s_mask), out = self.graphs[bucket]
        s_ids[:batch].copy_(ids)
        s_pos[:batch].copy_(pos)
        s_cpos.copy_(cache_position)
        s_mask[:batch].copy_(kv_mask)
        s_mask[batch:].zero_()
        graph.replay()
        return out[:batch]


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t with its batch dim grown to `rows` (zeros appended)."""
    if t.shape[0] == rows:
        return t.clone()
    pad = t.new_zeros((rows - t.shape[0], *t.shape[1:]))
    return torch.cat([t, pad])
