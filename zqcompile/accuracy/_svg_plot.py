"""A dependency-free SVG of the range panels of `zqcompile.accuracy.ranges` (used when matplotlib is absent):
per panel, one vertical segment per token (or weight row) from its min to its max, at x = layer."""
from __future__ import annotations

from pathlib import Path

import torch

PANEL_W, PANEL_H, PAD = 520, 190, 40
MAX_SEGMENTS = 64  # per layer; evenly subsampled so the file stays small


def _panel(x0: float, y0: float, title: str, series) -> list[str]:
    lo_all = min(float(lo.min()) for _, lo, _ in series)
    hi_all = max(float(hi.max()) for _, _, hi in series)
    span = (hi_all - lo_all) or 1.0
    layers = [k for k, _, _ in series]
    n = max(layers) + 1
    w, h = PANEL_W - 2 * PAD, PANEL_H - 2 * PAD

    def px(layer: float) -> float:
        return x0 + PAD + (layer + 0.5) * w / n

    def py(v: float) -> float:
        return y0 + PAD + (hi_all - v) / span * h

    out = [f'<text x="{x0 + PAD}" y="{y0 + PAD - 12}" font-size="12">{title}</text>',
           f'<rect x="{x0 + PAD}" y="{y0 + PAD}" width="{w}" height="{h}" fill="none" stroke="#888"/>',
           f'<text x="{x0 + 2}" y="{py(hi_all) + 4:.1f}" font-size="9">{hi_all:.3g}</text>',
           f'<text x="{x0 + 2}" y="{py(lo_all):.1f}" font-size="9">{lo_all:.3g}</text>',
           f'<line x1="{x0 + PAD}" x2="{x0 + PAD + w}" y1="{py(0):.1f}" y2="{py(0):.1f}" stroke="#ccc"/>',
           f'<text x="{x0 + PAD + w / 2 - 12}" y="{y0 + PAD + h + 14}" font-size="9">layer 0..{n - 1}</text>']
    for layer, lo, hi in series:
        idx = torch.linspace(0, lo.numel() - 1, min(MAX_SEGMENTS, lo.numel())).long()
        x = px(layer)
        segs = " ".join(f"M{x:.1f} {py(float(a)):.1f}V{py(float(b)):.1f}" for a, b in zip(lo[idx], hi[idx]))
        out.append(f'<path d="{segs}" stroke="#1f77b4" stroke-opacity="0.25" stroke-width="1"/>')
        out.append(f'<path d="M{x - 3:.1f} {py(float(hi.max())):.1f}h6M{x - 3:.1f} {py(float(lo.min())):.1f}h6" '
                   f'stroke="red"/>')
    return out


def write_svg(panels, out: Path) -> None:
    """panels: [(role, "activation"/"weight", [(layer, mins, maxs)])], two per row."""
    rows = (len(panels) + 1) // 2
    body = []
    for i, (role, kind, series) in enumerate(panels):
        what = "token-wise input range (min/max over K per token)" if kind == "activation" \
            else "row-wise weight range (min/max over K per row)"
        body += _panel((i % 2) * PANEL_W, (i // 2) * PANEL_H, f"{role}: {what}", series)
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * PANEL_W}" height="{rows * PANEL_H}" '
           f'font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n")
    Path(out).write_text(svg)
