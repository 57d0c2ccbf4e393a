"""Shard a float model for one tensor-parallel rank, before capture (Megatron-style): in every decoder layer,
q/k/v and gate/up become column-parallel (the rank's rows: its attention heads and KV heads, its slice of the
MLP), o_proj and down_proj row-parallel (the rank's K slice, then zq.all_reduce over the ranks and the bias
once). The config of the copy says the rank's head counts, so the KV cache and the attention the capture
records are the rank's. Everything else (embeddings, norms, the output head) is replicated.

The user's model is left as it was: the rank's model is a copy of its module tree whose replicated tensors are
the model's own (moved to the rank's device when asked), and whose sharded weights are new tensors. Each
shard is recorded as a WeightShard, so the pipeline plans and quantizes it as its slice of the full weight.
"""
from __future__ import annotations

import copy
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from zqcompile.errors import ConfigError
from zqcompile.parallel.group import Rank
from zqcompile.passes.base import WeightShard

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class RowParallelLinear(nn.Linear):
    """o_proj / down_proj of one rank: its K slice of the weight; the partial products summed over the ranks,
    then the bias once (every rank adds the same bias to the same sum)."""

    group: str = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.zq.all_reduce(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


def _text_config(model: nn.Module):
    c = model.config
    return c.get_text_config() if hasattr(c, "get_text_config") else c


def _blocks(model: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    return [m for m in model.modules() if all(isinstance(getattr(m, n, None), nn.Linear) for n in names)]


def check_shardable(model: nn.Module, size: int) -> None:
    """Raise ConfigError (one line, before any capture) unless `model` splits into `size` ranks: Llama-style
    decoder layers, heads, KV heads and the MLP width divisible by `size`."""
    c = _text_config(model) if hasattr(model, "config") else None
    name = type(model).__name__
    layers = getattr(c, "num_hidden_layers", None)
    attn, mlp = _blocks(model, ATTENTION), _blocks(model, MLP)
    if c is None or not attn or len(attn) != layers or len(mlp) != layers:
        raise ConfigError(f"tensor parallelism shards Llama-style decoder layers (attention {'/'.join(ATTENTION)}, "
                          f"MLP {'/'.join(MLP)} as nn.Linear); {name} has {len(attn)} such attention and {len(mlp)} "
                          f"such MLP block(s) for {layers} layer(s): run it without tp")
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    width = mlp[0].gate_proj.out_features
    bad = [f"{what} ({n})" for what, n in (("attention heads", heads), ("KV heads", kv), ("MLP width", width))
           if n % size]
    if bad:
        common = math.gcd(heads, kv, width)
        fits = [str(d) for d in range(2, common + 1) if common % d == 0][:4]
        raise ConfigError(f"tp={size} does not divide {name}'s {_listed(bad)}: every rank takes an equal share "
                          f"of the attention heads, KV heads and MLP width; "
                          + (f"use tp={' or '.join(fits)}" if fits else "this model cannot be split"))


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def shard_model(model: nn.Module, rank: Rank) -> tuple[nn.Module, dict[int, WeightShard]]:
    """The rank's model (see the module docstring) and its shards by id of the rank's weight."""
    check_shardable(model, rank.size)
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    part = copy.deepcopy(model, memo=dict(shared))  # new modules and config, the model's own tensors
    c = _text_config(part)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    c.head_dim = head_dim  # kept as it was: hidden_size // heads would change with the rank's head count
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    c.num_attention_heads //= rank.size
    c.num_key_value_heads = kv // rank.size
    c.intermediate_size = _blocks(part, MLP)[0].gate_proj.out_features // rank.size
    shards: dict[int, WeightShard] = {}

    def column(lin: nn.Linear) -> nn.Linear:
        return _sliced(nn.Linear, lin, 0, rank, shards)

    def row(lin: nn.Linear) -> nn.Linear:
        new = _sliced(RowParallelLinear, lin, 1, rank, shards)
        new.group = rank.group
        return new

    for attn in _blocks(part, ATTENTION):
        attn.q_proj, attn.k_proj, attn.v_proj = (column(getattr(attn, n)) for n in ATTENTION[:3])
        attn.o_proj = row(attn.o_proj)
    for mlp in _blocks(part, MLP):
        mlp.gate_proj, mlp.up_proj = column(mlp.gate_proj), column(mlp.up_proj)
        mlp.down_proj = row(mlp.down_proj)
    _place(part, rank.device)
    return part, shards


def _sliced(cls: type[nn.Linear], lin: nn.Linear, dim: int, rank: Rank, shards: dict[int, WeightShard]) -> nn.Linear:
    """A new `cls` holding the rank's slice of `lin` along dim (0: output rows and bias, 1: K, bias whole)."""
    full = lin.weight
    size = full.shape[dim] // rank.size
    start = rank.rank * size
    weight = full.detach().narrow(dim, start, size).to(rank.device, copy=True).contiguous()
    bias = lin.bias
    if bias is not None:
        bias = bias.detach().narrow(0, start, size) if dim == 0 else bias.detach()
        bias = bias.to(rank.device, copy=True)
    k, n = (full.shape[1], size) if dim == 0 else (size, full.shape[0])
    new = cls(k, n, bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias, requires_grad=False)
    shards[id(new.weight)] = WeightShard(full.detach(), dim, start, size, rank.size)
    return new


def _place(part: nn.Module, device: torch.device) -> None:
    """The replicated tensors on the rank's device: copies where they are elsewhere (the user's model stays where
    it is), each shared tensor once (tied embeddings stay tied)."""
    from zqcompile.runtime.constants import module_tensors, move_constants
    if any(t.device != device for _, _, t in module_tensors(part)):
        move_constants([part], device)
