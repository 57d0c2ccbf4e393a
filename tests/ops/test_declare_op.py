"""Adding an op is one declaration plus its backend registrations: a throwaway op declared here (its own
namespace, so the zq ops are untouched) is exported to ONNX in both dialects and coloured by the dump with no
table edited; an op declared without a translation, and a runtime-only op, are named by the exporter; the
declarations refuse backends their scope rules out. The registry forgets the throwaway ops afterwards."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnxscript import opset18 as op
from torch import Tensor

from zqcompile.errors import ExportError
from zqcompile.export.onnx import export_onnx, translation_table
from zqcompile.graph_dump import category, graph_text
from zqcompile.ops import registry
from zqcompile.ops import quant_math as qm

NS = "zqtest_registry"


@pytest.fixture(scope="module")
def new_ops():
    """clip_to_int8_range: x clamped to +-127 * scale (what a saturating static quantizer keeps), exported with
    a standard lowering; untranslated_op: declared, no translation registered."""

    @registry.declare("quant", cuda="reference", tensorrt="standard", namespace=NS)
    def clip_to_int8_range(x: Tensor, scale: float) -> Tensor:
        return x.clamp(-qm.QMAX[8] * scale, qm.QMAX[8] * scale)

    @clip_to_int8_range.register_fake
    def _(x, scale):
        return x.new_empty(x.shape)

    @registry.onnx_translation(f"{NS}::clip_to_int8_range", dialect="standard")
    def _(x, scale: float):
        limit = op.Constant(value_float=qm.QMAX[8] * float(scale))
        return op.Clip(x, op.Neg(limit), limit)

    @registry.declare("qdq", cuda="reference", tensorrt="standard", namespace=NS)
    def untranslated_op(x: Tensor) -> Tensor:
        return x * 2

    untranslated_op.register_fake(lambda x: x.new_empty(x.shape))
    yield clip_to_int8_range, untranslated_op
    for decl in (clip_to_int8_range, untranslated_op):
        registry.remove(decl.qualname)
    assert registry.lookup(clip_to_int8_range.overload) is None
    assert clip_to_int8_range.overload not in translation_table("standard")


class Clip(torch.nn.Module):
    def forward(self, x):
        return torch.relu(torch.ops.zqtest_registry.clip_to_int8_range(x, 0.02))


def _export(module, x, path, dialect):
    dims = ({0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC},)  # batch and sequence, as captured
    ep = torch.export.export(module, (x,), dynamic_shapes=dims, strict=False)
    return export_onnx(ep.module(), path, dialect=dialect, example_inputs=(x,)), ep.module()


@pytest.mark.parametrize("dialect", ["standard", "tensorrt"])
def test_new_op_exports_in_both_dialects(new_ops, tmp_path, dialect):
    import onnxruntime as ort
    x = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(0)) * 5  # many values past +-2.54
    path, _ = _export(Clip(), x, tmp_path / "m.onnx", dialect)
    model = onnx.load(str(path))
    assert {n.domain for n in model.graph.node} <= {""}  # no plugin node: tensorrt="standard"
    assert "Clip" in {n.op_type for n in model.graph.node}
    x2 = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1)) * 5
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_0": x2.numpy()})[0]
    want = torch.relu(x2.clamp(-2.54, 2.54)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert got.max() == pytest.approx(2.54)


def test_new_op_is_coloured_by_its_category(new_ops, tmp_path):
    gm = torch.export.export(Clip(), (torch.randn(2, 16),), strict=False).module()
    node = next(n for n in gm.graph.nodes if n.target == new_ops[0].overload)
    assert category(node) == "quant"
    assert f"{NS}::clip_to_int8_range(" in graph_text(gm) and "[quant]" in graph_text(gm)


def test_declared_op_without_translation_is_named(new_ops, tmp_path):
    class Untranslated(torch.nn.Module):
        def forward(self, x):
            return torch.ops.zqtest_registry.untranslated_op(x)

    with pytest.raises(ExportError) as err:
        _export(Untranslated(), torch.randn(2, 3, 16), tmp_path / "m.onnx", "standard")
    assert "@onnx_translation('untranslated_op', dialect='standard')" in str(err.value)
    assert not list(tmp_path.iterdir())


def test_runtime_only_op_is_refused_by_the_exporter(tmp_path):
    class Rotary(torch.nn.Module):
        def forward(self, q, k, cos, sin):
            return torch.ops.zq.rope(q, k, cos, sin)

    args = (torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8))
    gm = torch.export.export(Rotary(), args, strict=False).module()
    with pytest.raises(ExportError, match="zq::rope .* is runtime-only"):
        export_onnx(gm, tmp_path / "m.onnx", example_inputs=args, dynamic=False)
    assert not list(tmp_path.iterdir())


def test_declarations_refuse_backends_their_scope_rules_out():
    with pytest.raises(ValueError, match="runtime-only"):
        registry.onnx_translation("rope", dialect="standard")
    with pytest.raises(ValueError, match="tensorrt='standard'"):
        registry.onnx_translation("quantize_per_tensor", dialect="tensorrt")
    with pytest.raises(ValueError, match="reference-only on CUDA"):
        registry.cuda_kernel("dequantize_weight")
    with pytest.raises(KeyError, match="declares: quantize_per_token"):
        registry.cuda_kernel("quantise_per_token")
    with pytest.raises(ValueError, match="runtime-only op has no TensorRT lowering"):
        registry.declare("attention", cuda="kernel", tensorrt="plugin", runtime_only=True)
    with pytest.raises(ValueError, match="unknown op category"):
        registry.declare("gemm", cuda="kernel", tensorrt="plugin")
    with pytest.raises(ValueError, match="not_exported= explains a runtime-only op's refusal"):
        registry.declare("fused", cuda="kernel", tensorrt="plugin", not_exported="no")
    assert registry.op("rope").translations == {} and registry.op("dequantize_weight").cuda_kernel is None
