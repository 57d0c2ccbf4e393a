"""An experiment, not a product option: LKD's data-free random ids drawn i.i.d. from the FP model's own marginal
next-token distribution (the softmax of its logits averaged over every position of 8 x 128 uniform random ids; the
model is its own unigram prior, no text read) instead of uniformly, with the random-id settings
(LKD_TUNING["random"]), SmolLM2 W4/8A8, engine path. Like lkd_zipf_random.py it swaps torch.randint inside
zqcompile.accuracy.lkd for the run, then runs bench/accuracy/run.py with the given arguments:

    python bench/accuracy/lkd_marginal_random.py --path engine --threads 2 --rows "w4/8a8 + LKD(random)" \\
        --out bench/accuracy/results/lkd_random_marginal
"""
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import zqcompile.accuracy.lkd as L  # noqa: E402
from zqcompile.models import load_model  # noqa: E402

real = torch.randint


def marginal() -> torch.Tensor:
    model = load_model("smollm2").eval()
    vocab = model.config.vocab_size
    ids = real(0, vocab, (8, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        p = torch.softmax(model(ids).logits.float(), dim=-1).mean(dim=(0, 1))
    return p / p.sum()


P = marginal()


def marginal_randint(low, high, size, generator=None, **kw):
    if low != 0 or len(size) != 2 or high != P.numel():
        return real(low, high, size, generator=generator, **kw)
    return torch.multinomial(P, size[0] * size[1], replacement=True, generator=generator).view(*size)


shim = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
shim.randint = marginal_randint
L.torch = shim
from bench.accuracy import run  # noqa: E402
run.main(sys.argv[1:])
