"""Benchmark: zqcompile's standard-dialect W8A8 ONNX export vs ONNX Runtime's own `quantize_dynamic` INT8 model
of the same network, both run by ONNX Runtime on the CPU. One run: median latency over repeats, the ratio,
a markdown table on stdout, and JSON (device, versions, command line) + markdown under bench/results/.

    python bench/bench_onnx_cpu.py --arch bert --hidden 256 --layers 4 --batch 8 --seq 128
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402
from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: E402

import zqcompile as zq  # noqa: E402
from zqcompile.export.onnx import export_onnx  # noqa: E402


def build(arch: str, hidden: int, layers: int, ids: torch.Tensor):
    model = _model(arch, hidden=hidden, layers=layers)
    return model, zq.compile(model, (ids,), config="w8a8"), "zq.compile w8a8"


class _Logits(torch.nn.Module):
    """The model's main output tensor only, for the fp32 ONNX baseline."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        out = self.model(ids)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _model(arch: str, hidden: int, layers: int):
    import transformers as tf
    heads = max(1, hidden // 64)
    if arch == "bert":
        m = tf.BertModel(tf.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                       intermediate_size=4 * hidden, vocab_size=1024))
    elif arch == "gpt2":
        m = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=1024))
    else:
        raise SystemExit(f"unknown arch {arch}")
    return m.eval()


def fp32_onnx(model, ids: torch.Tensor, path: Path) -> None:
    wrapper = _Logits(model)
    torch.onnx.export(wrapper, (ids,), str(path), dynamo=True, input_names=["input_ids"], opset_version=18,
                      dynamic_shapes=({0: "batch", 1: "seq"},), verbose=False, external_data=False)


def time_session(path: Path, ids: np.ndarray, repeats: int, threads: int) -> tuple[float, np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: ids}
    out = sess.run(None, feed)[0]
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="bert", choices=["bert", "gpt2"])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = ORT default)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    torch.manual_seed(0)
    ids = torch.randint(0, 1024, (args.batch, args.seq))
    model, engine, how = build(args.arch, args.hidden, args.layers, ids)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_onnx(engine, tmp / "zq.onnx")
        fp32_onnx(model, ids, tmp / "fp32.onnx")
        quantize_dynamic(str(tmp / "fp32.onnx"), str(tmp / "ort_int8.onnx"), weight_type=QuantType.QInt8)
        ids_np = ids.numpy()
        rows = {}
        for name in ("fp32", "ort_int8", "zq"):
            ms, out = time_session(tmp / f"{name}.onnx", ids_np, args.repeats, args.threads)
            rows[name] = dict(ms=ms, mb=(tmp / f"{name}.onnx").stat().st_size / 1e6, out=out)
    fp = rows["fp32"]["out"]
    for r in rows.values():
        r["max_abs_err_vs_fp32"] = float(np.abs(r.pop("out") - fp).max())
    result = dict(
        bench="onnx_cpu", arch=args.arch, hidden=args.hidden, layers=args.layers, batch=args.batch, seq=args.seq,
        repeats=args.repeats, zq_model=how, rows=rows, ratio_zq_over_ort_int8=rows["zq"]["ms"] / rows["ort_int8"]["ms"],
        device=platform.processor() or platform.machine(), cpu_count=torch.get_num_threads(),
        versions=dict(torch=torch.__version__, onnxruntime=ort.__version__, python=platform.python_version()),
        command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]), time=time.strftime("%Y-%m-%d %H:%M:%S"))
    table = ["| model | ORT CPU ms (median) | size MB | max abs diff vs FP32 |", "|---|---|---|---|"]
    names = {"fp32": "FP32 (torch.onnx)", "ort_int8": "ORT quantize_dynamic INT8", "zq": f"zqcompile {how}"}
    for k, r in rows.items():
        table.append(f"| {names[k]} | {r['ms']:.2f} | {r['mb']:.1f} | {r['max_abs_err_vs_fp32']:.3g} |")
    table.append(f"\nzqcompile / quantize_dynamic latency ratio: **{result['ratio_zq_over_ort_int8']:.2f}** "
                 f"({args.arch}, hidden {args.hidden}, {args.layers} layers, batch {args.batch}, seq {args.seq}, "
                 f"{result['cpu_count']} threads, one run)")
    md = "\n".join(table)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"onnx_cpu_{args.arch}_h{args.hidden}_l{args.layers}_b{args.batch}_s{args.seq}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
