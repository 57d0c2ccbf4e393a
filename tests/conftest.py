"""Shared fixtures: small random-init models of each family and a cache of compiled engines, so the suite
compiles each (model, preset) once."""
from __future__ import annotations

import os

import pytest
import torch

import zqcompile as zq
from zqcompile.models import tiny_model

# Under pytest-xdist (README's test command) each worker's torch takes its share of the cores, not all of them:
# two workers with two intra-op threads each on a 2-core machine would fight over both.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

_MODELS: dict = {}
_ENGINES: dict = {}


def model_for(family: str):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family)
    return _MODELS[family]


def ids(batch: int, seq: int, seed: int = 0, vocab: int = 1000) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def engine_for(family: str, config: str):
    key = (family, config)
    if key not in _ENGINES:
        # logits only (tests/test_generation.py builds generation graphs where it tests them)
        _ENGINES[key] = zq.compile(model_for(family), (ids(2, 16),), config=config, generation=False)
    return _ENGINES[key]


def main_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def dequantized_load_quantizes_activations(hf_model) -> bool:
    """Whether a compressed-tensors folder loaded with CompressedTensorsConfig(dequantize=True) still quantizes the
    activations: transformers 5.17 + compressed-tensors 0.20.1 (the H200 image) keep each layer's input-activation
    scheme after decompressing (0.7% of the largest logit from W8A16 on the tiny llama); 5.24 drops it."""
    return any(getattr(getattr(m, "quantization_scheme", None), "input_activations", None) is not None
               for m in hf_model.modules())


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
