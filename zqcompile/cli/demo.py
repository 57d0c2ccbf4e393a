"""`zqcompile demo`: compile small built-in models with each preset and compare them with fp32 eager
(`--real`: the real SmolLM2-135M end to end, in demo_real.py)."""
from __future__ import annotations


def _rel_err(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def demo_rows(families=("bert", "gpt2"), configs=("w8a8", "w4/8a8", "ptq-static")) -> list[dict]:
    """Compile small built-in models and compare each engine with fp32 eager (also used by tests)."""
    import torch

    import zqcompile as zq
    from zqcompile.cli.compile import example_ids
    from zqcompile.models import tiny_model
    rows = []
    for fam in families:
        model = tiny_model(fam, hidden=128, layers=2)
        ids = example_ids(model, 2, 32)
        test_ids = example_ids(model, 3, 48, seed=1)
        with torch.no_grad():
            ref = model(test_ids)
        ref_t = ref.logits if hasattr(ref, "logits") else ref.last_hidden_state
        fp_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        for cfg in configs:
            engine = zq.compile(model, (ids,), config=cfg, generation=False)  # numerics of the forward only
            out = engine(test_ids)
            out_t = out.logits if hasattr(out, "logits") else out.last_hidden_state
            row = {"model": f"{fam} (random init)", "config": cfg, "rel_l2_err": _rel_err(out_t, ref_t),
                   "weight_bytes_ratio": engine.weight_bytes() / fp_bytes, "engine": engine}
            if hasattr(ref, "logits"):
                row["top1_agree"] = float((out_t.argmax(-1) == ref_t.argmax(-1)).float().mean())
            rows.append(row)
    return rows


def cmd_demo(args) -> int:
    if getattr(args, "real", False):
        from zqcompile.cli.demo_real import run_real_demo
        return run_real_demo(args)
    rows = demo_rows()
    print(rows[3]["engine"].report())
    print("\nNumerics vs fp32 eager (reference CPU ops):")
    print(f"{'model':20} {'config':11} {'rel L2 err':>10} {'top-1 agree':>11} {'bytes vs fp32':>13}")
    for r in rows:
        agree = f"{r['top1_agree']:.3f}" if "top1_agree" in r else "-"
        print(f"{r['model']:20} {r['config']:11} {r['rel_l2_err']:10.4f} {agree:>11} {r['weight_bytes_ratio']:13.3f}")
    return 0


def add_demo_command(sub) -> None:
    d = sub.add_parser("demo", help="compile small built-in models and compare with fp32")
    d.add_argument("--real", action="store_true", help="run the real SmolLM2-135M model (needs the [real] extra)")
    d.set_defaults(fn=cmd_demo)
