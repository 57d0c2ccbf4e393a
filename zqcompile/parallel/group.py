"""The tensor-parallel option and the process group behind it: `TensorParallel(size, device, timeout_s)` is what a
user gives `zq.compile(..., tp=...)`; `join` puts this process into the torch.distributed group of `size` ranks
(NCCL on CUDA, gloo on CPU), from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) or a group the caller initialized. The group's timeout bounds every collective, so a rank that
exits or hangs makes the others raise TensorParallelError instead of waiting for ever.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

from zqcompile.errors import ConfigError, TensorParallelError

_DEVICES = (None, "cpu", "cuda")
_BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


@dataclass(frozen=True)
class TensorParallel:
    """Run the engine over `size` processes, one per rank, each holding 1/size of the attention heads, the KV
    cache and the MLP (column-parallel q/k/v and gate/up, row-parallel o_proj and down_proj with one all-reduce
    after each). Launch one process per rank (`torchrun --nproc-per-node SIZE ...`), each calling zq.compile with
    the same model, inputs, config and this option.

    device: where this rank's shard runs: "cuda" (cuda:LOCAL_RANK, NCCL), "cpu" (gloo), or None for the model's
    device. timeout_s: how long any collective (and joining the group) waits for the other ranks before this
    rank raises TensorParallelError; it must cover the ranks' difference in compile time."""

    size: int
    device: str | None = None
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"TensorParallel.size must be an integer >= 1, got {self.size!r}")
        if self.device not in _DEVICES:
            raise ConfigError(f"TensorParallel.device must be 'cuda', 'cpu' or None (the model's device), "
                              f"got {self.device!r}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise ConfigError(f"TensorParallel.timeout_s must be a number of seconds > 0, got {self.timeout_s!r}")


@dataclass(frozen=True)
class Rank:
    """This process's place in the group: what the sharding and the all-reduce op need."""

    rank: int
    size: int
    group: str  # torch.distributed group_name, the zq.all_reduce argument
    device: torch.device
    backend: str

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size} ({self.backend}, {self.device})"


def _device(tp: TensorParallel, model_device: torch.device) -> torch.device:
    kind = tp.device or model_device.type
    if kind not in _BACKENDS:
        raise ConfigError(f"tensor parallelism runs on CUDA (NCCL) or the CPU (gloo), not on {kind!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("TensorParallel(device='cuda') but no CUDA device is visible to this process")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


def _launch_hint(size: int) -> str:
    return (f"launch one process per rank, e.g. `torchrun --nproc-per-node {size} -m zqcompile generate ... "
            f"--tp {size}`, or call torch.distributed.init_process_group first")


def check_launch(size: int) -> int:
    """This process's rank from the environment torchrun sets, when it was launched as one of `size` ranks;
    ConfigError (what to run instead) otherwise. Cheap: the command line asks before loading the model."""
    world = os.environ.get("WORLD_SIZE")
    if world is None or "RANK" not in os.environ:
        raise ConfigError(f"tp={size} needs {size} processes, and this one was not launched as a rank (no RANK / "
                          f"WORLD_SIZE in its environment); {_launch_hint(size)}")
    if world != str(size):
        raise ConfigError(f"tp={size} but {world} process(es) were launched (WORLD_SIZE={world}); "
                          f"{_launch_hint(size)}")
    return int(os.environ["RANK"])


def join(tp: TensorParallel, model_device: torch.device) -> Rank:
    """Join (or check) the default process group for `tp`; raises ConfigError for a launch that does not match."""
    import torch.distributed as dist
    device = _device(tp, model_device)
    backend = _BACKENDS[device.type]
    if dist.is_initialized():
        if dist.get_world_size() != tp.size:
            raise ConfigError(f"tp={tp.size} but the initialized process group has {dist.get_world_size()} "
                              f"rank(s); {_launch_hint(tp.size)}")
    else:
        check_launch(tp.size)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=tp.timeout_s))
        except Exception as e:  # noqa: BLE001 - the store's or backend's failure, one line with the cause
            raise TensorParallelError(f"tensor parallel: rank {os.environ['RANK']} could not join the group of "
                                      f"{tp.size} within {tp.timeout_s:g} s: {_first_line(e)}") from None
    return Rank(dist.get_rank(), tp.size, dist.group.WORLD.group_name, device, dist.get_backend())


def agree(rank: Rank, what: str, value: Any) -> None:
    """Every rank must hold the same `value` (the config, the model's shape, the compiled plan): a rank that
    got other arguments is named instead of computing wrong numbers; a rank that is gone raises
    TensorParallelError after the group's timeout."""
    import torch.distributed as dist
    values: list[Any] = [None] * rank.size
    try:
        dist.all_gather_object(values, value)
    except Exception as e:  # noqa: BLE001
        raise TensorParallelError(f"tensor parallel: {rank.describe()}: the other ranks did not answer while "
                                  f"checking {what} (a rank exited, or did not answer within the process "
                                  f"group's timeout): {_first_line(e)}") from None
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise ConfigError(f"tensor parallel: ranks disagree on {what}: rank 0 has {values[0]!r}, rank {differ[0]} "
                          f"has {values[differ[0]]!r}; launch every rank with the same model and arguments")


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__
