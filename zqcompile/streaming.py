"""Streamed compiles: a Hugging Face safetensors folder quantized block by block, its float model never in memory.

1. `skeleton`: the model built from config.json with fake parameters (shape, dtype and device only: the way
   accelerate's init_empty_weights keeps parameters off memory, buffers real: computed at construction as
   usual, the persistent ones then read from the folder). Capture (torch.export in the parameters' fake mode),
   the pass pipeline and the generation graphs run on it as on a loaded model: every constant a pass derives
   from a weight is made through SharedConstants.derive, so here it is a fake tensor with a recipe.
2. `Materializer`: per transformer block, the block's tensors are read from the folder straight to the device,
   each constant of the block (quantized weights and scales, float norm weights) is made again from them by
   its recipe and put in place of its placeholder in every graph, and the float tensors are dropped before the
   next block. What lies outside the blocks (embeddings, final norm, head) is one more group.

Peak memory is the quantized model plus one block's float weights and their concatenations; the engine is the
in-memory compile's bit for bit (the same recipes on the same values on the same device). Configurations
that calibrate on activations through the whole model cannot stream: `check_streamable` says so first.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from zqcompile import progress
from zqcompile.capture import get_tensor, is_placeholder
from zqcompile.checkpoint import SafetensorsFolder
from zqcompile.config import ConfigError, QuantConfig
from zqcompile.errors import CaptureError, ModelLoadError
from zqcompile.memory import LiveBytes
from zqcompile.models import auto_class, read_config
from zqcompile.passes.classify_gemms import check_finite
from zqcompile.passes.constants import SharedConstants
from zqcompile.runtime.constants import module_tensors


def why_not_streamable(cfg: QuantConfig) -> str | None:
    """Why `cfg` needs the whole float model at once (None: it streams)."""
    if cfg.feature_scales is not None:
        return "calibrates feature-wise scales on activations that flow through every earlier block"
    if cfg.uses_static_activations:
        return "calibrates static activation ranges by running the whole model"
    if cfg.accuracy_budget is not None:
        return "measures its accuracy budget through the whole model"
    return None


def check_streamable(cfg: QuantConfig, instead: str) -> None:
    """ConfigError for a configuration that needs the whole float model at once; `instead` says what to do."""
    why = why_not_streamable(cfg)
    if why is not None:
        raise ConfigError(f"config {cfg.name!r} {why}, which a compile streamed block by block from a folder "
                          f"does not do: {instead}")


@dataclass
class Skeleton:
    """A model whose parameters are placeholders, and where each one's values are in the folder."""

    model: nn.Module
    folder: SafetensorsFolder
    names: dict[int, str]  # id(placeholder parameter) -> the folder's tensor name
    block_of: dict[int, int | None]  # id(placeholder parameter) -> transformer block index, None outside them


@contextlib.contextmanager
def _fake_parameters(mode: FakeTensorMode, device: torch.device) -> Iterator[None]:
    """Every parameter a module registers meanwhile becomes a fake tensor of its shape and dtype on `device`."""
    register = nn.Module.register_parameter

    def fake(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, _placeholder(param, mode, device) if param is not None else None)
    nn.Module.register_parameter = fake
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _placeholder(param: nn.Parameter, mode: FakeTensorMode, device: torch.device) -> nn.Parameter:
    if is_placeholder(param):
        return param
    with mode:
        data = torch.empty_strided(param.shape, param.stride(), dtype=param.dtype, device=device)
    return nn.Parameter(data, requires_grad=param.requires_grad)


def _all_placeholders(model: nn.Module, mode: FakeTensorMode, device: torch.device) -> None:
    """A parameter put into a module's table directly (not through register_parameter) becomes one too, so no
    initial value can stand in for the folder's (tied parameters stay tied)."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and not is_placeholder(p):
                module._parameters[name] = made.setdefault(id(p), _placeholder(p, mode, device))


def skeleton(path: str, dtype: torch.dtype, device: torch.device) -> Skeleton:
    """The folder's model with placeholder parameters on `device` in `dtype` (what load_model(path, dtype=dtype)
    would hold, without its values). Every parameter is matched to a tensor of the folder, shapes checked."""
    from zqcompile.accuracy.lkd import find_blocks
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = SafetensorsFolder(path)
    config = read_config(path)
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # real buffers and inputs mix with the placeholders
    with _fake_parameters(mode, device):  # no float model is allocated, let alone initialized
        model = auto_class(config).from_config(config, dtype=dtype).eval()
    _all_placeholders(model, mode, device)
    if os.path.isfile(os.path.join(path, "generation_config.json")):  # as from_pretrained reads it
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(path)
    _real_buffers(model, folder, device)
    try:
        prefix, _ = find_blocks(model)
        block = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    except ValueError:  # no list of blocks found: the whole model is one group (the report says how many)
        block = None
    names, block_of, missing = {}, {}, []
    for name, p in model.named_parameters(remove_duplicate=False):  # tied weights: any of the names
        if id(p) in names:
            continue
        found = next((n for n in _candidates(model, name) if n in folder), None)
        if found is None:
            missing.append(name)
            continue
        if folder.shapes[found] != tuple(p.shape):
            raise ModelLoadError(f"{folder.files[found]}: tensor {found!r} has shape {list(folder.shapes[found])}; "
                                 f"config.json makes it {list(p.shape)}")
        names[id(p)] = found
        m = block.match(name) if block is not None else None
        block_of[id(p)] = int(m.group(1)) if m else None
    if missing:
        raise ModelLoadError(f"{path!r} has no tensor for parameter(s) {', '.join(missing[:3])}"
                             f"{' ...' if len(missing) > 3 else ''}: not the weights of this config.json, or "
                             f"stored under names from_pretrained converts (MoE experts saved one by one, as "
                             f"Mixtral's), which a streamed compile does not read yet: load the model instead "
                             f"(--in-memory, or zq.compile(load_model(path), ...))")
    return Skeleton(model, folder, names, block_of)


def _candidates(model: nn.Module, name: str) -> list[str]:
    """Folder names a parameter may be saved under: its own, and with/without the base model's prefix (a
    checkpoint of the bare LlamaModel has no `model.`)."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    other = name[len(prefix):] if name.startswith(prefix) else prefix + name
    return [name, other] if prefix != "." else [name]


def _real_buffers(model: nn.Module, folder: SafetensorsFolder, device: torch.device) -> None:
    """Buffers onto `device`; a persistent one the folder holds gets the folder's values (as from_pretrained)."""
    for mod_name, module in model.named_modules():
        for name, buf in list(module._buffers.items()):
            if buf is None:
                continue
            full = f"{mod_name}.{name}" if mod_name else name
            saved = next((n for n in _candidates(model, full) if n in folder), None)
            if saved is not None and name not in module._non_persistent_buffers_set:
                buf = folder.load(saved, device, buf.dtype)
            module._buffers[name] = buf.to(device)


class Materializer:
    """Called by the compile with its graphs and their SharedConstants once every graph went through the
    pipeline: makes every placeholder constant real, group by group (see the module docstring)."""

    def __init__(self, sk: Skeleton, device: torch.device):
        self.sk, self.device = sk, device
        self.live = LiveBytes()  # transient float tensors: loaded or derived, not kept by the engine as they are
        self.blocks = 0
        self.largest_block_bytes = 0  # what the folder holds for the largest transformer block, in the compile dtype

    def stats(self) -> dict:
        return {"stream_blocks": self.blocks, "stream_largest_block_bytes": self.largest_block_bytes,
                "stream_peak_transient_bytes": self.live.peak}

    def __call__(self, graphs: list[fx.GraphModule], constants: SharedConstants) -> None:
        groups = self._groups(graphs, constants)
        self.blocks = sum(key is not None for key in groups)
        bar = progress.bar(len(groups), "streaming weights from the folder", unit="group")
        with bar:
            for key in sorted(groups, key=lambda b: -1 if b is None else b):
                self._make(graphs, constants, key, groups[key])
                bar.update(1)
        for g in graphs:
            left = [n.target for n in g.graph.nodes if n.op == "get_attr" and is_placeholder(get_tensor(g, n))]
            if left:  # e.g. a tensor the forward made while it was traced on the skeleton
                raise CaptureError(f"a streamed compile has no values for {left[0]!r} (made while capturing, from "
                                   f"no weight of the folder): load the model and compile it in memory")

    def _groups(self, graphs, constants: SharedConstants) -> dict[int | None, list]:
        """The graphs' placeholder constants (each once) by the block their sources lie in."""
        groups: dict[int | None, list] = defaultdict(list)
        seen: set[int] = set()
        for g in graphs:
            for _, attr, t in module_tensors(g):
                if id(t) in seen:
                    continue
                seen.add(id(t))
                made = constants.recipe_of(t)
                sources = [s for s in (constants.sources_of(made) if made is not None else [t]) if is_placeholder(s)]
                if not sources:
                    continue  # made from real tensors only (a buffer), or no weight at all (the KV cache)
                unknown = [s for s in sources if id(s) not in self.sk.names]
                if unknown:
                    raise RuntimeError(f"constant {attr!r} has no values and no recipe to make them from the folder")
                blocks = [self.sk.block_of[id(s)] for s in sources]
                groups[max((b for b in blocks if b is not None), default=None)].append((t, made))
        return groups

    def _make(self, graphs, constants: SharedConstants, block: int | None, group: list) -> None:
        loaded: dict[int, torch.Tensor] = {}
        as_is = {id(t) for t, made in group if made is None}  # float weights the engine keeps (norms, head)

        def value_of(s: torch.Tensor) -> torch.Tensor:
            if not is_placeholder(s):
                return s
            if id(s) not in loaded:
                name = self.sk.names[id(s)]
                t = self.sk.folder.load(name, self.device, s.dtype)
                check_finite(name, t)
                if id(s) not in as_is:
                    self.live.track(t)
                loaded[id(s)] = t
            return loaded[id(s)]

        memo = _Counted(self.live)
        new = {id(t): value_of(t) if made is None else constants.remake(made, value_of, memo) for t, made in group}
        if block is not None:
            self.largest_block_bytes = max(self.largest_block_bytes,
                                           sum(t.numel() * t.element_size() for t in loaded.values()))
        _install(graphs, new)
        for t in new.values():
            self.live.keep(t)  # part of the engine now (the weight scales the memo counted)


class _Counted(dict):
    """A remake memo that counts every float tensor put in it (the transient concatenations) in `live`."""

    def __init__(self, live: LiveBytes):
        super().__init__()
        self.live = live

    def __setitem__(self, key, value) -> None:
        for t in value if isinstance(value, tuple) else (value,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.live.track(t)
        super().__setitem__(key, value)


def _install(graphs: list[fx.GraphModule], new: dict[int, torch.Tensor]) -> None:
    """Put new[id(placeholder)] in place of each placeholder, in every graph (one object per placeholder, so
    what the graphs shared they still share)."""
    params: dict[int, nn.Parameter] = {}
    for g in graphs:
        for owner, attr, t in list(module_tensors(g)):
            value = new.get(id(t))
            if value is None:
                continue
            if attr in owner._parameters:
                owner._parameters[attr] = params.setdefault(id(t), nn.Parameter(value, requires_grad=False))
            else:
                owner._buffers[attr] = value
