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

from zqcompile.config import classify_role
from zqcompile.accuracy.fakequant import Conv1D, is_gemm_module

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
    from zqcompile.accuracy.lkd import find_blocks
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


def has_matplotlib() -> bool:
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def figure_path(out: str | Path) -> Path:
    """The file plot_ranges will write for `out`: ".svg" instead of ".png" when matplotlib is absent."""
    out = Path(out)
    return out if has_matplotlib() or out.suffix.lower() == ".svg" else out.with_suffix(".svg")


def plot_ranges(ranges: list[GemmRanges], out: str | Path) -> Path:
    """Write the figure atomically to figure_path(out) (an existing figure there is replaced, any other file
    refused); returns the path written."""
    from zqcompile.files import atomic_file, looks_like_figure
    out = figure_path(out)
    panels = _panels(ranges)
    if not panels:
        raise ValueError("no GEMM inside a transformer block was found to plot")
    with atomic_file(out, "figure", replaceable=looks_like_figure, kind="a PNG or SVG figure",
                     suffix=out.suffix) as tmp:
        if not has_matplotlib():
            from zqcompile.accuracy._svg_plot import write_svg
            write_svg(panels, Path(tmp))
            return out
        _plot_matplotlib(panels, tmp)
    return out


def _plot_matplotlib(panels, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
