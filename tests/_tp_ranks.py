"""One tensor-parallel rank of tests/test_tensor_parallel.py, run by torchrun: compiles the tiny Llama unquantized
with tp=2, writes its logits and 16 greedy tokens to OUT/rank<r>.json, then generates again with a fault: rank 1
stops answering after 3 tokens (its streamer sleeps), and rank 0 must fail with TensorParallelError once the
group's timeout (argv[2] seconds) has passed. Rank 0 prints how long it waited, then lets the error end it."""
from __future__ import annotations

import json
import os
import sys
import time

import torch

import zqcompile as zq
from zqcompile.models import tiny_model

out_dir, timeout = sys.argv[1], float(sys.argv[2])
rank = int(os.environ["RANK"])
ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
engine = zq.compile(tiny_model("llama"), (ids,), "none", generation=zq.CacheSpec(2, 64),
                    tp=zq.TensorParallel(2, timeout_s=timeout))
result = {"logits": engine(ids).logits.tolist(), "tokens": engine.generate(ids, max_new_tokens=16).tolist(),
          "record": engine.record.tensor_parallel, "report": engine.report()}
try:
    engine.save(os.path.join(out_dir, f"rank{rank}.zq"))
except zq.InputError as e:
    result["save_refused"] = str(e)
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)


class StopAnswering:
    """A streamer (put / end) that, on rank 1, sleeps after the prompt and 3 tokens: a rank that hangs mid-run."""

    def __init__(self) -> None:
        self.calls = 0

    def put(self, _tokens) -> None:
        self.calls += 1
        if rank == 1 and self.calls == 4:
            with open(os.path.join(out_dir, "hang_started"), "w") as f:
                f.write(str(time.time()))
            time.sleep(3600)

    def end(self) -> None:
        pass


t0 = time.time()
try:
    engine.generate(ids, max_new_tokens=16, streamer=StopAnswering())
except zq.TensorParallelError:
    print(f"rank {rank} failed at {time.time():.3f}, {time.time() - t0:.1f} s into generating", file=sys.stderr,
          flush=True)
    raise
print(f"rank {rank}: the fault did not stop generation", file=sys.stderr)
