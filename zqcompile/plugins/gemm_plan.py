"""The kernel plan of an engine: for every quantized GEMM of the compile record, the kernel the chooser
(plugins/gemm_kernels.py) picks per M bucket on the engine's device, written into record.gemms[i]["kernels"]
(shown by report(), saved with the engine, in the dump's plan.json). The problem of each GEMM is recorded at
compile from its graph node (`problem_of_node`); the plan is made when the device is known -- at compile, when the
engine first runs on a device, when it moves -- and says "reference (CPU)" on CPU. The TensorRT choice on the same
device is recorded beside it (it differs where the PyTorch-only fp16 dequant path would run).
"""
from __future__ import annotations

from dataclasses import asdict, replace
from typing import Optional, Union

import torch
from torch import fx

from zqcompile.plugins.gemm_kernels import (CPU, M_BUCKETS, GemmDevice, GemmProblem, NoGemmKernel, bucket_name,
                                            plan_buckets, plan_text, problem_of)

_GEMM_OPS = ("int8_gemm_dequant", "fp8_gemm_dequant", "weight_only_gemm")


def problem_of_node(node: fx.Node) -> Optional[GemmProblem]:
    """The GemmProblem of a zq GEMM node from its operands' fake tensors (meta['val']); None for other nodes."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or target.namespace != "zq" \
            or target._opname not in _GEMM_OPS:
        return None
    name = target._opname

    def val(a):
        return a.meta.get("val") if isinstance(a, fx.Node) else None

    two_level = False
    if name == "int8_gemm_dequant":
        x, _, wq, ws, bias, res, _, bits, out_dtype = node.args[:9]
        two_level = bool(node.args[9] if len(node.args) > 9 else node.kwargs.get("two_level", False))
    elif name == "fp8_gemm_dequant":
        (x, _, wq, ws, bias, res, _, out_dtype), bits = node.args, 8
    else:
        x, wq, ws, bias, res, _, bits = node.args
        out_dtype = val(x).dtype
    if any(val(a) is None for a in (x, wq, ws)):
        return None
    return problem_of(name, val(x), val(wq), val(ws), val(bias), val(res), bits, out_dtype, two_level=two_level)


def gemm_device(device: Union[torch.device, str, GemmDevice]) -> GemmDevice:
    """The GemmDevice of a torch device (loading the kernel library for a CUDA device)."""
    if isinstance(device, GemmDevice):
        return device
    device = torch.device(device)
    if device.type != "cuda":
        return replace(CPU, name=device.type) if device.type != "cpu" else CPU
    from zqcompile import plugins
    index = device.index if device.index is not None else torch.cuda.current_device()
    if plugins.load():
        from zqcompile.plugins import cuda_gemm
        return cuda_gemm.device_of(index)
    return GemmDevice(f"cuda:{index} {torch.cuda.get_device_name(index)}", torch.cuda.get_device_capability(index))


def plan_gemm(problem: GemmProblem, device: GemmDevice) -> dict:
    """{"planned_for", "buckets": {bucket: kernel}, "fallbacks": {bucket: kernel}, "skipped": {bucket: {kernel:
    reason}}, and on CUDA "tensorrt": {bucket: kernel} + "tensorrt_plan": the plugin's kernel_plan field}."""
    choices = plan_buckets(problem, device)
    names = [bucket_name(i) for i in range(len(M_BUCKETS))]
    plan = {"planned_for": device.describe(),
            "buckets": {b: c.label for b, c in zip(names, choices)},
            "fallbacks": {b: c.fallback.name for b, c in zip(names, choices) if c.fallback},
            "skipped": {b: dict(c.skipped) for b, c in zip(names, choices) if c.skipped}}
    if device.capability is not None:
        trt = replace(device, library=True, tensorrt=True)  # the plugin links the kernel library
        try:
            plan["tensorrt"] = {b: c.label for b, c in zip(names, plan_buckets(problem, trt))}
            plan["tensorrt_plan"] = plan_text(problem, trt)
        except NoGemmKernel as e:
            plan["tensorrt"] = {b: "none" for b in names}
            plan["tensorrt_plan"] = f"none: {e}"
    return plan


def record_problems(record, problems: dict[str, GemmProblem]) -> None:
    """Store each GEMM's problem (by module FQN) in the record, as plain data."""
    for g in record.gemms:
        if g["fqn"] in problems:
            g["problem"] = {k: v for k, v in asdict(problems[g["fqn"]]).items() if k != "m"}


def plan_record(record, device: Union[torch.device, str, GemmDevice]) -> None:
    """Write the kernel plan for `device` into every GEMM of the record that has a problem (cheap when the
    record is already planned for that device)."""
    d = gemm_device(device)
    gemms = [g for g in record.gemms if "problem" in g]
    if not gemms or gemms[0].get("kernels", {}).get("planned_for") == d.describe():  # planned together
        return
    for g in gemms:
        g["kernels"] = plan_gemm(GemmProblem(**g["problem"]), d)
