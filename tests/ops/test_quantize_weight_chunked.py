"""quantize_weight in row chunks (the compile's peak memory) gives exactly what the one-piece formula gives,
for every granularity, INT8 and INT4, chunks that split row groups' neighbours and K groups."""
from __future__ import annotations

import pytest
import torch

from zqcompile.ops import quant_math as qm


def one_piece(w, bits, granularity, num_groups=None, group_size=None):
    """The formula without chunks (zqcompile before the chunked version)."""
    n, k = w.shape
    gk = qm.check_weight_groups((n, k), bits, granularity, num_groups, group_size)
    qmax = qm.QMAX[bits]
    wf = w.float()
    if granularity == "tensor":
        amax = wf.abs().amax().clamp_min(qm.EPS).expand(n, 1)
    elif granularity == "row_groups":
        g = n if num_groups is None else num_groups
        amax = wf.reshape(g, n // g * k).abs().amax(dim=1).clamp_min(qm.EPS).repeat_interleave(n // g).reshape(n, 1)
    else:
        amax = wf.reshape(n, k // gk, gk).abs().amax(dim=2).clamp_min(qm.EPS)
    scale = (amax / qmax).contiguous()
    q = torch.round(wf / scale.repeat_interleave(k // scale.shape[1], dim=1)).clamp_(-qmax, qmax).to(torch.int8)
    return (qm.pack_int4(q) if bits == 4 else q), scale


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("granularity,num_groups,group_size", [
    ("row_groups", None, None), ("row_groups", 6, None), ("row_groups", 1, None), ("tensor", None, None),
    ("k_groups", None, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_equals_one_piece(bits, granularity, num_groups, group_size, dtype):
    torch.manual_seed(0)
    w = torch.randn(48, 96, dtype=dtype)
    w[5, 7] = 40.0  # an outlier in one row / group
    want = one_piece(w, bits, granularity, num_groups, group_size)
    for chunk in (1, 96 * 5, 96 * 16, 1 << 24):  # one row (or one row group) at a time ... one piece
        got = qm.quantize_weight(w, bits, granularity, num_groups, group_size, chunk_elems=chunk)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), chunk
