"""The export subcommand, with a stand-in loader (the real one is zqcompile.api.load)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import onnx
import torch

from zqcompile.cli.export import add_export_command

from onnx_helpers import outlier_tokens


@dataclass
class FakeEngine:
    gm: torch.fx.GraphModule
    example_inputs: tuple
    input_names: list


class Quant(torch.nn.Module):
    def forward(self, x):
        return torch.ops.zq.quantize_per_token(x)


def _engine(_path):
    x = outlier_tokens(2, 4, 16)
    dims = ({0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC},)
    return FakeEngine(torch.export.export(Quant(), (x,), dynamic_shapes=dims).module(), (x,), ["hidden"])


def _cli(argv):
    parser = argparse.ArgumentParser(prog="zqcompile")
    add_export_command(parser.add_subparsers(dest="cmd"), load=_engine)
    args = parser.parse_args(argv)
    return args.func(args)


def test_export_onnx_and_trt_dialect(tmp_path, capsys):
    assert _cli(["export", "m.zq", "--format", "onnx", "-o", str(tmp_path / "m.onnx")]) == 0
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert model.graph.input[0].name == "hidden"
    assert _cli(["export", "m.zq", "--format", "onnx-trt", "-o", str(tmp_path / "t.onnx")]) == 0
    assert [n.op_type for n in onnx.load(str(tmp_path / "t.onnx")).graph.node] == ["ZqQuantizePerToken"]
    assert "wrote" in capsys.readouterr().out


def test_export_tensorrt_without_tensorrt_fails_cleanly(tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
        return
    except ImportError:
        pass
    assert _cli(["export", "m.zq", "--format", "tensorrt", "-o", str(tmp_path / "m.plan")]) == 1
    assert "tensorrt" in capsys.readouterr().err
    assert not (tmp_path / "m.plan").exists()
