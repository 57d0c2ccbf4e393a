"""Stand-in for zq.compile until it lands on main: capture a tiny random-init HF model with torch.export and
rewrite every linear (aten.linear, GPT-2's aten.addmm) into quantize_per_token + int8_gemm_dequant, with weights
from quant_math.quantize_weight. Used by the export end-to-end tests and bench/bench_onnx_cpu.py only."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export import Dim

from zqcompile.ops import quant_math as qm

aten, zq = torch.ops.aten, torch.ops.zq


@dataclass
class StandinEngine:
    gm: torch.fx.GraphModule
    example_inputs: tuple
    input_names: list

    def __call__(self, *inputs):
        return self.gm(*inputs)


def tiny_model(arch: str):
    import transformers as tf
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256,
                  max_position_embeddings=128)
    if arch == "bert":
        model = tf.BertModel(tf.BertConfig(**common))
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=256, n_positions=128))
    elif arch == "opt":
        model = tf.OPTForCausalLM(tf.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                               vocab_size=256, max_position_embeddings=128, word_embed_proj_dim=64))
    else:
        raise ValueError(arch)
    torch.manual_seed(0)
    for p in model.parameters():  # random init with a few outlier channels, as trained LLMs have
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        out = self.model(ids, use_cache=False) if "bert" not in type(self.model).__name__.lower() else self.model(ids)
        return out[0]


def capture(model, ids: torch.Tensor) -> torch.fx.GraphModule:
    cfg = model.config
    max_seq = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 128)
    dims = ({0: Dim("batch", max=64), 1: Dim("seq", max=max_seq - 8)},)
    return torch.export.export(_Logits(model), (ids,), dynamic_shapes=dims, strict=False).module()


def _weight(gm, node) -> torch.Tensor:
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj.detach()


def quantize_linears(gm: torch.fx.GraphModule, bits: int = 8, group_size: int | None = None) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.linear.default, aten.addmm.default):
            continue
        if node.target is aten.linear.default:
            x, w_node, b = (list(node.args) + [None])[:3]
            w = _weight(gm, w_node)
        else:
            b, x, w_node = node.args
            w = _weight(gm, w_node).t()
        if w_node.op != "get_attr" or w.shape[0] == 256:  # keep the vocab projection float, as presets do
            continue
        gran = "k_groups" if group_size else "row_groups"
        wq, ws = qm.quantize_weight(w.contiguous(), bits, gran, group_size=group_size)
        gm.register_buffer(f"zq_w{count}", wq)
        gm.register_buffer(f"zq_s{count}", ws)
        with gm.graph.inserting_before(node):
            qs = gm.graph.call_function(zq.quantize_per_token.default, (x,))
            q = gm.graph.call_function(__import__("operator").getitem, (qs, 0))
            s = gm.graph.call_function(__import__("operator").getitem, (qs, 1))
            wqn, wsn = gm.graph.get_attr(f"zq_w{count}"), gm.graph.get_attr(f"zq_s{count}")
            y = gm.graph.call_function(zq.int8_gemm_dequant.default,
                                       (q, s, wqn, wsn, b, None, "none", bits, torch.float32))
        y.meta.update(node.meta)
        node.replace_all_uses_with(y)
        gm.graph.erase_node(node)
        count += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return count


def standin_compile(arch: str, ids: torch.Tensor, bits: int = 8, group_size: int | None = None) -> StandinEngine:
    model = tiny_model(arch)
    gm = capture(model, ids)
    n = quantize_linears(gm, bits, group_size)
    assert n >= 8, f"only {n} linears quantized"
    return StandinEngine(gm, (ids,), ["input_ids"])
