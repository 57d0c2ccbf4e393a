"""A tensor-parallel rank's quantized weight is exactly its slice of the single-process one: quantize_weight_shard
on a row slice (column-parallel q/k/v, gate/up) or a K slice (row-parallel o_proj, down_proj) equals slicing
quantize_weight(full), weight and scales, for every granularity, INT8 and INT4; a slice that cuts a group is
refused."""
from __future__ import annotations

import pytest
import torch

from zqcompile.ops import quant_math as qm

SCHEMES = [("row_groups", None, None), ("row_groups", 4, None), ("tensor", None, None), ("k_groups", None, 16),
           ("k_groups", None, None)]


def _slice_of_full(w, dim, start, size, bits, granularity, num_groups, group_size):
    wq, ws = qm.quantize_weight(w, bits, granularity, num_groups, group_size)
    per_byte = 2 if bits == 4 and dim == 1 else 1
    wq = wq.narrow(dim, start // per_byte, size // per_byte)
    if dim == 0:
        ws = ws.narrow(0, start, size)
    elif ws.shape[1] > 1:
        gk = w.shape[1] // ws.shape[1]
        ws = ws.narrow(1, start // gk, size // gk)
    return wq, ws


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("granularity,num_groups,group_size", SCHEMES)
@pytest.mark.parametrize("dim", [0, 1])
def test_shard_is_the_slice_of_the_full_quantization(bits, granularity, num_groups, group_size, dim):
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(3))
    w[5, 17] = 40.0  # an outlier that sets its row's, its group's and the tensor's scale on one rank only
    tp = 2
    size = w.shape[dim] // tp
    for rank in range(tp):
        shard = w.narrow(dim, rank * size, size).contiguous()
        got = qm.quantize_weight_shard(w, shard, dim, rank * size, bits, granularity, num_groups, group_size)
        want = _slice_of_full(w, dim, rank * size, size, bits, granularity, num_groups, group_size)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (rank, dim, granularity)


def test_a_slice_that_cuts_a_group_is_refused():
    w = torch.randn(24, 96)
    with pytest.raises(ValueError, match="cuts a K group of 32"):
        qm.quantize_weight_shard(w, w[:, 48:].contiguous(), 1, 48, 8, "k_groups", group_size=32)
    with pytest.raises(ValueError, match="cut a row group of 8 rows"):
        qm.quantize_weight_shard(w, w[12:].contiguous(), 0, 12, 8, "row_groups", num_groups=3)
