"""GPU smoke of ZeroQuant-HERO's quantized attention (QuantConfig.attention, reference op only): the op on CUDA
tensors against CPU, and a tiny LLaMA W8A8 + AttentionQuant() engine generating on CUDA against the same engine on
CPU. Developer tooling (a device call: `PYTHONPATH=. python scripts/gpu_quant_attention_smoke.py`), not CI."""
import time
from dataclasses import replace

import torch

import zqcompile as zq
from zqcompile.config import AttentionQuant, get_config
from zqcompile.generation.kv_cache import CacheSpec
from zqcompile.models import tiny_model
from zqcompile.ops import quant_math as qm

t0 = time.time()
g = torch.Generator().manual_seed(0)
q = torch.randn(2, 4, 8, 16, generator=g)
k, v = torch.randn(2, 2, 8, 16, generator=g), torch.randn(2, 2, 8, 16, generator=g)
for fp8, pt, pv in ((False, False, False), (False, True, True), (True, True, True)):
    a = qm.quant_attention(q, k, v, None, 0.25, True, fp8, pt, pv)
    b = qm.quant_attention(q.cuda(), k.cuda(), v.cuda(), None, 0.25, True, fp8, pt, pv).cpu()
    print("op cpu vs cuda max diff", fp8, pt, pv, float((a - b).abs().max()))
m = tiny_model("llama"); ids = torch.randint(3, 100, (2, 10), generator=g)
cfg = replace(get_config("w8a8"), attention=AttentionQuant())
e_cpu = zq.compile(m, (ids,), config=cfg, generation=CacheSpec(2, 40))
out_cpu = e_cpu.generate(ids, max_new_tokens=8)
mc = tiny_model("llama").cuda()
e_gpu = zq.compile(mc, (ids.cuda(),), config=cfg, generation=CacheSpec(2, 40))
out_gpu = e_gpu.generate(ids.cuda(), max_new_tokens=8).cpu()
print("generate cpu == cuda:", torch.equal(out_cpu, out_gpu), out_cpu[0, -8:].tolist(), out_gpu[0, -8:].tolist())
print("report has quant-attention:", "quant-attention" in e_gpu.report(), f"{time.time() - t0:.0f} s")
