"""An experiment, not a product option: LKD's data-free random ids drawn from a Zipf prior over the vocabulary's id
order (BPE ids follow merge order, roughly frequency: p(id) ~ 1 / (id - 16), SmolLM2's 17 special ids never) instead
of uniformly, with the random-id settings (LKD_TUNING["random"]), SmolLM2 W4/8A8, engine path. It swaps
torch.randint inside zqcompile.accuracy.lkd for the run, then runs bench/accuracy/run.py with the given arguments:

    python bench/accuracy/lkd_zipf_random.py --path engine --threads 1 --rows "w4/8a8 + LKD(random)" \
        --out bench/accuracy/results/lkd_random_zipf

Result (2026-12-03, CPU, shared): 28.49 ppl, 14% of the gap (uniform ids: 26.94, 35%): not better."""
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import zqcompile.accuracy.lkd as L  # noqa: E402

real = torch.randint
SPECIAL = 17  # SmolLM2's special tokens are ids 0-16


def zipf_randint(low, high, size, generator=None, **kw):
    if low != 0 or len(size) != 2 or high < 1000:
        return real(low, high, size, generator=generator, **kw)
    ranks = torch.arange(high, dtype=torch.float64)
    p = 1.0 / (ranks - SPECIAL + 1.0).clamp(min=1.0)
    p[:SPECIAL] = 0
    idx = torch.multinomial(p.float(), size[0] * size[1], replacement=True, generator=generator)
    return idx.view(*size)


shim = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
shim.randint = zipf_randint
L.torch = shim
from bench.accuracy import run  # noqa: E402
run.main(sys.argv[1:])
