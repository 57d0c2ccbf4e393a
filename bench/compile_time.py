"""CPU compile time of the pass pipeline's fake-tensor check: incremental (passes.ShapeCheck, the default) against
a full propagation after every pass, same process, interleaved, on a tiny LLaMA with generation graphs.

    python bench/compile_time.py [--repeat 3] [--out bench/results/compile_time_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

import zqcompile as zq
from zqcompile import passes as P
from zqcompile.models import tiny_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default="bench/results/compile_time_cpu.json")
    args = p.parse_args(argv)
    model, ids = tiny_model("llama", layers=2), torch.randint(3, 1000, (1, 16))

    def compile_s() -> float:
        t = time.perf_counter()
        zq.compile(model, (ids,), config="w8a8", generation=zq.CacheSpec(2, 64))
        return time.perf_counter() - t

    compile_s()  # warm-up (imports, first-call caches)
    incremental = P.ShapeCheck.__call__
    every_node = lambda self, gm, full=False: incremental(self, gm, True)  # noqa: E731 - the check before
    times = {"full": [], "incremental": []}
    for _ in range(args.repeat):
        with mock.patch.object(P.ShapeCheck, "__call__", every_node):
            times["full"].append(compile_s())
        times["incremental"].append(compile_s())
    med = {k: statistics.median(v) for k, v in times.items()}
    result = dict(command=" ".join(sys.argv), torch=torch.__version__, threads=torch.get_num_threads(), seconds=times,
                  median_s=med, speedup=med["full"] / med["incremental"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"full check after every pass {med['full']:.2f} s, incremental {med['incremental']:.2f} s "
          f"({result['speedup']:.2f}x); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
