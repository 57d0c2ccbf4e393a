import torch

from zqcompile.accuracy.ranges import collect_ranges, plot_ranges, summary_table

from ._tiny import tiny_gpt2, tiny_llama


def test_ranges_match_manual_computation():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    ranges = collect_ranges(model, ids)
    by = {r.fqn: r for r in ranges}
    assert len(ranges) == 2 * 7 + 1
    r = by["model.layers.1.mlp.down_proj"]
    assert r.role == "fc2" and r.layer == 1
    seen = {}
    h = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        model(ids)
    h.remove()
    x = seen["x"].reshape(-1, seen["x"].shape[-1])
    assert torch.equal(r.act_min, x.amin(-1)) and torch.equal(r.act_max, x.amax(-1))
    assert r.act_min.numel() == 20
    w = model.model.layers[1].mlp.down_proj.weight
    assert torch.equal(r.weight_row_max, w.amax(1)) and torch.equal(r.weight_row_min, w.amin(1))
    amax = torch.maximum(x.amax(-1).abs(), x.amin(-1).abs())
    assert abs(r.act_range_spread - float(amax.max() / amax.median())) < 1e-4
    assert by["lm_head"].layer == -1


def test_conv1d_rows_are_output_rows():
    model = tiny_gpt2()
    r = {r.fqn: r for r in collect_ranges(model, torch.randint(0, 128, (1, 6)))}["transformer.h.0.mlp.c_fc"]
    w = model.transformer.h[0].mlp.c_fc.weight  # [K, N]
    assert r.weight_row_max.numel() == w.shape[1] and torch.equal(r.weight_row_max, w.amax(0))


def test_plot_writes_a_figure(tmp_path):
    ranges = collect_ranges(tiny_gpt2(), torch.randint(0, 128, (1, 6)))
    out = plot_ranges(ranges, tmp_path / "ranges.png")
    assert out.exists() and out.stat().st_size > 500
    if out.suffix == ".svg":
        text = out.read_text()
        assert text.startswith("<svg") and text.count("<path") >= 2 * 4 * 2
    assert "transformer.h.1.attn.c_attn" in summary_table(ranges)
