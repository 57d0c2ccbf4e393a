"""TensorRT dialect: every fused zq op becomes exactly one `zq.trt` node whose attributes are its plugin's
fields; the model passes the full ONNX checker; export_tensorrt without TensorRT names the missing package."""
from __future__ import annotations

import onnx
import pytest
import torch

from zqcompile.export import tensorrt as zq_trt
from zqcompile.ops import quant_math as qm
from zqcompile.plugins import trt_spec

from onnx_helpers import export_module, outlier_tokens

zq = torch.ops.zq
K, N = 64, 48


class Block(torch.nn.Module):
    """LN+quant -> W4A8 GEMM (+gelu) -> act quant -> W8A8 GEMM (+residual) -> RMS norm quant -> W8A16 GEMM."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w4, s4 = qm.quantize_weight(torch.randn(N, K, generator=g), 4, "k_groups", group_size=16)
        w8, s8 = qm.quantize_weight(torch.randn(K, N, generator=g), 8)
        for name, t in dict(w4=w4, s4=s4, w8=w8, s8=s8, lnw=torch.ones(K), lnb=torch.zeros(K), b=torch.randn(N)).items():
            self.register_buffer(name, t)

    def forward(self, x):
        q, s, _, _ = zq.norm_quant(x, None, self.lnw, self.lnb, 1e-5, "layer", False, False)
        h = zq.int8_gemm_dequant(q, s, self.w4, self.s4, self.b, None, "gelu", 4, torch.float32)
        q2, s2, _ = zq.act_quant(h, None, None, "none", False)
        y = zq.int8_gemm_dequant(q2, s2, self.w8, self.s8, None, x, "none", 8, torch.float32)
        q3, s3, out, hsum = zq.norm_quant(y, x, self.lnw, None, 1e-6, "rms", True, True)
        z = zq.weight_only_gemm(out, self.w8.t().contiguous(), torch.ones(K, 1) * 0.01, None, None, "relu", 8)
        return q3, s3, hsum, z


@pytest.fixture(scope="module")
def trt_model(tmp_path_factory):
    path = export_module(Block(), (outlier_tokens(2, 5, K),), tmp_path_factory.mktemp("trt") / "m.trt.onnx",
                         dialect="tensorrt")
    return onnx.load(str(path))


def test_fused_ops_become_single_plugin_nodes(trt_model):
    plugin_nodes = [n for n in trt_model.graph.node if n.domain == trt_spec.DOMAIN]
    assert [n.op_type for n in plugin_nodes] == ["ZqNormQuant", "ZqInt8GemmDequant", "ZqActQuant",
                                                 "ZqInt8GemmDequant", "ZqNormQuant", "ZqWeightOnlyGemm"]
    assert not any(n.op_type in ("MatMulInteger", "LayerNormalization") for n in trt_model.graph.node)
    assert {(o.domain, o.version) for o in trt_model.opset_import} >= {(trt_spec.DOMAIN, 1)}


def test_plugin_nodes_carry_exactly_their_fields(trt_model):
    from zqcompile.export.onnx_trt_ops import present_outputs
    by_name = {s.name: s for s in trt_spec.PLUGINS.values()}
    for node in (n for n in trt_model.graph.node if n.domain == trt_spec.DOMAIN):
        spec = by_name[node.op_type]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert sorted(attrs) == sorted(spec.field_names), node.op_type
        kinds = {onnx.AttributeProto.INT: "int", onnx.AttributeProto.FLOAT: "float", onnx.AttributeProto.STRING: "str"}
        assert {a.name: kinds[a.type] for a in node.attribute} == {f.name: f.type for f in spec.fields}
        n_in = sum(1 for p in spec.inputs if p.optional_flag is None or attrs[p.optional_flag] == 1)
        assert len(node.input) == n_in and len(node.output) == present_outputs(spec, attrs)


def test_int4_weights_are_int8_bytes_for_the_plugin(trt_model):
    inits = {t.name: t for t in trt_model.graph.initializer}
    gemm = next(n for n in trt_model.graph.node if n.op_type == "ZqInt8GemmDequant")
    w = inits[gemm.input[2]]
    assert w.data_type == onnx.TensorProto.INT8 and list(w.dims) == [N, K // 2]
    assert onnx.helper.get_attribute_value(next(a for a in gemm.attribute if a.name == "w_bits")) == 4


def test_dynamic_axes_kept(trt_model):
    dims = trt_model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[:2]] == ["batch", "seq"] and dims[2].dim_value == K


def test_export_tensorrt_without_tensorrt_names_the_package(tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    with pytest.raises(zq_trt.TensorRTUnavailable, match="`tensorrt` Python package"):
        zq_trt.export_tensorrt(torch.nn.Identity(), tmp_path / "m.plan")
    with pytest.raises(zq_trt.TensorRTUnavailable, match="tensorrt"):
        zq_trt.load_tensorrt(tmp_path / "m.plan")
    assert not list(tmp_path.iterdir())


def _kernel_plans(model) -> list[tuple[str, str]]:
    return [(n.op_type, onnx.helper.get_attribute_value(a).decode()) for n in model.graph.node
            if n.domain == trt_spec.DOMAIN for a in n.attribute if a.name == "kernel_plan"]


def test_gemm_plugins_carry_the_chosen_kernel_plan(trt_model):
    """fp32 outputs: the CUDA-core kernel at every M (the tensor-core kernels write fp16/bf16); the weight-only
    plugin takes fp16 x, whose one TensorRT kernel is the CUDA-core one."""
    simt = "4:simt,16:simt,32:simt,64:simt,128:simt,1024:simt,inf:simt"
    assert _kernel_plans(trt_model) == [("ZqInt8GemmDequant", simt)] * 2 + [("ZqWeightOnlyGemm", simt)]
    meta = {p.key: p.value for p in trt_model.metadata_props}
    if not torch.cuda.is_available():
        assert meta["zqcompile.gemm_kernels_planned_for"].startswith("sm_90 (assumed: no CUDA device at export)")


class HalfGemms(torch.nn.Module):
    """fp16 out: a W8A8 row-scaled GEMM and a W4A8 GEMM with K groups of 32."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        w8, s8 = qm.quantize_weight(torch.randn(64, 128, generator=g), 8)
        w4, s4 = qm.quantize_weight(torch.randn(64, 64, generator=g), 4, "k_groups", group_size=32)
        for name, t in dict(w8=w8, s8=s8, w4=w4, s4=s4).items():
            self.register_buffer(name, t)

    def forward(self, xq, xs):
        y = zq.int8_gemm_dequant(xq, xs, self.w8, self.s8, None, None, "none", 8, torch.float16)
        q, s, _ = zq.act_quant(y, None, None, "none", False)
        return zq.int8_gemm_dequant(q, s, self.w4, self.s4, None, None, "none", 4, torch.float16)


@pytest.mark.parametrize("device,plans", [
    (("H200", (9, 0), True), ["4:skinny/simt,16:skinny/mma,32:skinny/mma,64:skinny/mma,128:sm90/simt,"
                              "1024:sm90/simt,inf:sm90/simt",
                              "4:simt,16:simt,32:mma/simt,64:mma/simt,128:mma/simt,1024:mma/simt,inf:mma/simt"]),
    (("A100", (8, 0), False), ["4:simt,16:mma/simt,32:mma/simt,64:mma/simt,128:mma/simt,1024:mma/simt,inf:mma/simt",
                               "4:simt,16:simt,32:mma/simt,64:mma/simt,128:mma/simt,1024:mma/simt,inf:mma/simt"])])
def test_kernel_plan_follows_the_target_device(tmp_path, device, plans):
    from zqcompile.export.onnx import export_onnx
    from zqcompile.plugins.gemm_kernels import GemmDevice
    name, cap, sm90 = device
    xq, xs = qm.quantize_per_token(outlier_tokens(2, 5, 128))
    ep = torch.export.export(HalfGemms(), (xq, xs), strict=False)
    target = GemmDevice(name, cap, library=True, sm90_library=sm90)
    path = export_onnx(ep.module(), tmp_path / "m.trt.onnx", dialect="tensorrt", example_inputs=(xq, xs),
                       dynamic=False, gemm_device=target)
    model = onnx.load(str(path))
    assert [p for _, p in _kernel_plans(model)] == plans
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["zqcompile.gemm_kernels_planned_for"].startswith(f"{name} (sm_{cap[0]}{cap[1]}")
