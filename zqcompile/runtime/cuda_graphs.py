"""Run an engine's graph under CUDA graphs: one graph per input-shape bucket (batch x sequence), captured on
first use and replayed after. Small-batch transformer inference is launch-bound on a fast GPU (FACTS.md:
BERT-base bs1 spends more time launching than computing), so replaying one graph replaces hundreds of
launches. Outputs are cloned out of the graph's static memory so callers may keep them.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._pytree import tree_map


class ShapeBucketedGraphs:
    def __init__(self, fn: Callable, warmup: int = 2, max_graphs: int = 32):
        self.fn = fn
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], object]] = {}
        self.pool = None

    @staticmethod
    def key(tensors: list[torch.Tensor]) -> tuple:
        return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)

    def _capture(self, tensors: list[torch.Tensor]):
        static = [t.clone() for t in tensors]
        side = torch.cuda.Stream()
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

    def __call__(self, *tensors: torch.Tensor):
        k = self.key(list(tensors))
        entry = self.graphs.get(k)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:  # a new shape each call: graphs would only cost memory
                with torch.no_grad():
                    return self.fn(*tensors)
            entry = self.graphs[k] = self._capture(list(tensors))
        graph, static, out = entry
        for s, t in zip(static, tensors):
            s.copy_(t)
        graph.replay()
        return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, out)
