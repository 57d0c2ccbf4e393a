"""Bad input to export_onnx: an op without translation is named with its module; a failed write leaves no file."""
from __future__ import annotations

import onnx
import pytest
import torch

from zqcompile.export.onnx import ExportError, export_onnx

from onnx_helpers import export_module, outlier_tokens


@torch.library.custom_op("zqtest::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class Inner(torch.nn.Module):
    def forward(self, x):
        return torch.ops.zqtest.mystery(x)


class Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.ModuleDict({"block0": Inner()})

    def forward(self, x):
        q, s = torch.ops.zq.quantize_per_token(x)
        return self.encoder["block0"](s * q.float())


def test_untranslatable_op_names_op_and_module(tmp_path):
    with pytest.raises(ExportError) as err:
        export_module(Outer(), (outlier_tokens(2, 3, 16),), tmp_path / "m.onnx")
    msg = str(err.value)
    assert "zqtest::mystery" in msg and "encoder.block0" in msg
    assert not list(tmp_path.iterdir())


def test_missing_folder_is_a_clear_error(tmp_path):
    gm = torch.export.export(torch.nn.ReLU(), (torch.randn(2, 3),)).module()
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(gm, tmp_path / "nope" / "m.onnx", example_inputs=(torch.randn(2, 3),), dynamic=False)


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "m.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "previous", [], [])), str(target))
    previous = target.read_bytes()

    def save_half_then_fail(model, path, **kwargs):
        with open(path, "wb") as f:
            f.write(model.SerializeToString()[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", save_half_then_fail)
    gm = torch.export.export(torch.nn.ReLU(), (torch.randn(2, 3),)).module()
    with pytest.raises(ExportError, match="No space left"):
        export_onnx(gm, target, example_inputs=(torch.randn(2, 3),), dynamic=False)
    assert target.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_export_never_replaces_a_file_that_is_not_an_onnx_model(tmp_path):
    notes = tmp_path / "notes.onnx"
    notes.write_text("my notes")
    gm = torch.export.export(torch.nn.ReLU(), (torch.randn(2, 3),)).module()
    with pytest.raises(ExportError, match="not an ONNX model is there"):
        export_onnx(gm, notes, example_inputs=(torch.randn(2, 3),), dynamic=False)
    assert notes.read_text() == "my notes"


def test_unknown_dialect(tmp_path):
    with pytest.raises(ExportError, match="unknown ONNX dialect"):
        export_onnx(torch.nn.ReLU(), tmp_path / "m.onnx", dialect="tflite", example_inputs=(torch.randn(2),))


def test_plain_module_needs_example_inputs(tmp_path):
    with pytest.raises(ExportError, match="example_inputs"):
        export_onnx(torch.nn.ReLU(), tmp_path / "m.onnx")
