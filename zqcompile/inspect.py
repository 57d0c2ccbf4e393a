"""Activation and weight ranges per GEMM (the paper's Figure 1): why token-wise activation and group-wise
weight quantization are needed for a given model.

`collect_ranges` runs the fp model once with forward hooks on every nn.Linear / HF Conv1D and returns, per
GEMM, the min/max over features of each token of its input (token-wise activation ranges) and the
min/max of each output row of its weight (row-wise weight ranges). `plot_ranges` draws them per layer and
role: a PNG with matplotlib (`pip install -e '.[plot]'`), else an SVG written here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import classify_role
from .fakequant import Conv1D, is_gemm_module

ROLE_ORDER = ("qkv", "attn_out", "fc1", "fc2")


@dataclass(frozen=True)
class GemmRanges:
    fqn: str
    role: str
    layer: int  # index of the transformer block, -1 outside the blocks (e.g. the head)
    act_min: torch.Tensor  # [num_tokens] min over K of each token of the GEMM input
    act_max: torch.Tensor  # [num_tokens]
    weight_row_min: torch.Tensor  # [N] min over K of each output row of W [N, K]
    weight_row_max: torch.Tensor  # [N]

    @property
    def act_range_spread(self) -> float:
        """max over tokens of the token's max|x| / median over tokens: >> 1 means one per-tensor scale
        wastes most INT8 levels on the typical token."""
        amax = torch.maximum(self.act_max.abs(), self.act_min.abs())
        return float(amax.max() / amax.median().clamp_min(1e-12))

    @property
    def weight_range_spread(self) -> float:
        amax = torch.maximum(self.weight_row_max.abs(), self.weight_row_min.abs())
        return float(amax.max() / amax.median().clamp_min(1e-12))


def _layer_of(fqn: str, prefix: str | None) -> int:
    if prefix and fqn.startswith(prefix + "."):
        head = fqn[len(prefix) + 1:].split(".", 1)[0]
        if head.isdigit():
            return int(head)
    return -1


@torch.no_grad()
def collect_ranges(model: nn.Module, input_ids: torch.Tensor) -> list[GemmRanges]:
    """One fp forward of `input_ids` ([B, T]); ranges for every GEMM, in execution order."""
    from .lkd import find_blocks
    try:
        prefix, _ = find_blocks(model)
    except ValueError:
        prefix = None
    acts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    gemms = {name: m for name, m in model.named_modules() if is_gemm_module(m)}

    def hook(name):
        def fn(_mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            acts[name] = (x.amin(dim=-1).cpu(), x.amax(dim=-1).cpu())
        return fn

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in gemms.items()]
    try:
        model(input_ids.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    out = []
    for name in acts:
        m = gemms[name]
        w = (m.weight.t() if isinstance(m, Conv1D) else m.weight).detach().float().cpu()
        out.append(GemmRanges(name, classify_role(name), _layer_of(name, prefix), *acts[name],
                              w.amin(dim=1), w.amax(dim=1)))
    return out


def summary_table(ranges: list[GemmRanges]) -> str:
    lines = [f"{'GEMM':48s} {'role':8s} {'act min':>9s} {'act max':>9s} {'tok spread':>10s} "
             f"{'w min':>8s} {'w max':>8s} {'row spread':>10s}"]
    for r in ranges:
        lines.append(f"{r.fqn:48s} {r.role:8s} {float(r.act_min.min()):9.3g} {float(r.act_max.max()):9.3g} "
                     f"{r.act_range_spread:10.1f} {float(r.weight_row_min.min()):8.3g} "
                     f"{float(r.weight_row_max.max()):8.3g} {r.weight_range_spread:10.1f}")
    return "\n".join(lines)


def _panels(ranges: list[GemmRanges]) -> list[tuple[str, str, list[tuple[int, torch.Tensor, torch.Tensor]]]]:
    """(role, "activation"/"weight", [(layer, mins, maxs)]) for each role present in the blocks; of the
    GEMMs sharing a role and layer (q/k/v, gate/up) the first is drawn (they share the input)."""
    panels = []
    for role in ROLE_ORDER:
        per_layer: dict[int, GemmRanges] = {}
        for r in ranges:
            if r.role == role and r.layer >= 0:
                per_layer.setdefault(r.layer, r)
        if per_layer:
            items = sorted(per_layer.items())
            panels.append((role, "activation", [(k, r.act_min, r.act_max) for k, r in items]))
            panels.append((role, "weight", [(k, r.weight_row_min, r.weight_row_max) for k, r in items]))
    return panels


def plot_ranges(ranges: list[GemmRanges], out: str | Path) -> Path:
    """Write the figure; returns the path written (".svg" instead of ".png" when matplotlib is absent,
    and a message says so)."""
    out = Path(out)
    panels = _panels(ranges)
    if not panels:
        raise ValueError("no GEMM inside a transformer block was found to plot")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if out.suffix.lower() != ".svg":
            out = out.with_suffix(".svg")
            print(f"matplotlib is not installed (pip install -e '.[plot]'): writing an SVG instead: {out}")
        from ._svg_plot import write_svg
        write_svg(panels, out)
        return out
    nrows = len(panels) // 2
    fig, axes = plt.subplots(nrows, 2, figsize=(12, 2.6 * nrows), squeeze=False)
    for ax, (role, kind, series) in zip(axes.flat, panels):
        for layer, lo, hi in series:
            ax.vlines([layer] * lo.numel(), lo.numpy(), hi.numpy(), linewidth=0.5, alpha=0.3)
            ax.plot([layer], [float(hi.max())], "r_")
            ax.plot([layer], [float(lo.min())], "r_")
        what = "token-wise input range" if kind == "activation" else "row-wise weight range"
        ax.set_title(f"{role}: {what}", fontsize=9)
        ax.set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---- CLI: `zqcompile inspect MODEL --out ranges.png` (cli.py calls add_inspect_command) ------------------
DEFAULT_PROMPT = ("The quick brown fox jumps over the lazy dog. Quantization maps floating-point values to "
                  "a small set of integers; outliers in a few tokens or channels stretch the range.")


def add_inspect_command(subparsers):
    p = subparsers.add_parser("inspect", help="token-wise activation / row-wise weight ranges (paper Fig. 1)")
    p.add_argument("model", help="HF folder, .gguf file, or an installed model name (smollm2, minilm)")
    p.add_argument("--out", default="ranges.png", help="figure path (.png needs matplotlib; else .svg)")
    p.add_argument("--text", default=None, help="text file to run (default: a built-in sentence)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.set_defaults(func=lambda args: (run_inspect(args), 0)[1])
    return p


def run_inspect(args) -> list[GemmRanges]:
    import json

    from .lkd import max_positions
    from .eval_cli import load_for_eval
    model, tokenizer, _ = load_for_eval(args.model)
    args.max_tokens = min(args.max_tokens, max_positions(model) or args.max_tokens)
    if tokenizer is not None:
        text = Path(args.text).read_text() if args.text else DEFAULT_PROMPT
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][: args.max_tokens]])
    else:  # no tokenizer: random ids still show the weight ranges and the activation shape
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (1, args.max_tokens), generator=torch.Generator().manual_seed(0))
    ranges = collect_ranges(model, ids)
    print(summary_table(ranges))
    written = plot_ranges(ranges, args.out)
    print(f"wrote {written}")
    if args.json:
        Path(args.json).write_text(json.dumps([
            {"fqn": r.fqn, "role": r.role, "layer": r.layer, "act_min": r.act_min.tolist(),
             "act_max": r.act_max.tolist(), "weight_row_min": r.weight_row_min.tolist(),
             "weight_row_max": r.weight_row_max.tolist()} for r in ranges]))
    return ranges
