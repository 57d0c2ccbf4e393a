"""Shared helpers for the ONNX backend tests: export a tiny module that calls zq ops, run it in ORT CPU."""
from __future__ import annotations

import numpy as np
import torch
from torch.export import Dim

from zqcompile.export.onnx import export_onnx


def outlier_tokens(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Random activations where a few tokens (and one channel) carry 50-100x outliers, as in real LLMs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    flat = x.view(-1, shape[-1])
    flat[:: max(1, flat.shape[0] // 3)] *= 60.0
    flat[:, 3] *= 20.0
    flat[1] = 0.0  # an all-zero token exercises the EPS clamp
    return x.to(dtype)


def export_module(module: torch.nn.Module, inputs: tuple, path, dialect: str = "standard", dynamic: bool = True):
    """torch.export the module (dynamic batch/seq like the capture does), then export_onnx its GraphModule."""
    dims = tuple({0: Dim.DYNAMIC, 1: Dim.DYNAMIC} if x.dim() >= 2 else None for x in inputs)
    ep = torch.export.export(module, inputs, dynamic_shapes=dims if dynamic else None, strict=False)
    return export_onnx(ep.module(), path, dialect=dialect, example_inputs=inputs)


def run_ort(path, inputs: tuple) -> list[np.ndarray]:
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)}
    return sess.run(None, feeds)
