"""One GEMM under Nsight Compute: the decode-shaped kernel's configurations on one shape (default: the Llama-3-8B
gate+up, K = 4096, N = 28672, INT4 K groups of 128, M = 64), each launched twice (profile the second: the first
warms the caches and the attribute); --path wgmma / mma: that kernel's configurations instead (large M).

    ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
        --section LaunchStats -k regex:gemm_skinny python bench/profile_skinny.py --configs 0 2 3 > prof.txt
    ncu ... -k regex:gemm_wgmma --launch-skip 1 python bench/profile_skinny.py --path wgmma --m 8192 --configs 0

Developer tooling (GPU only): no output of its own but the launches' return codes."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from zqcompile import plugins  # noqa: E402
from zqcompile.ops import quant_math as qm  # noqa: E402
from zqcompile.plugins import cuda_gemm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=28672)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128, help="K-group size; 0: row scales")
    ap.add_argument("--configs", type=int, nargs="+", default=[0, 2, 3])
    ap.add_argument("--path", default="skinny", choices=["skinny", "wgmma", "mma"])
    a = ap.parse_args()
    if not plugins.load():
        raise SystemExit(f"no zq CUDA kernel library: {plugins.status()}")
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(a.n, a.k, device="cuda", generator=g) * 0.05
    wq, ws = qm.quantize_weight(w, a.bits, "k_groups" if a.group else "row_groups", group_size=a.group or None)
    xq, xs = qm.quantize_per_token(torch.randn(a.m, a.k, device="cuda", generator=g))
    out = torch.empty(a.m, a.n, device="cuda", dtype=torch.float16)
    for cfg in a.configs:
        rcs = [cuda_gemm.launch_gemm(a.path, xq, xs.reshape(a.m), wq, ws, None, None, "none", a.bits, out,
                                     config=cfg) for _ in range(2)]
        torch.cuda.synchronize()
        print(f"config {cfg}: cudaError {rcs}")


if __name__ == "__main__":
    main()
