"""Tensor parallelism on torch.distributed: the `tp=` option of zq.compile (group.py: the option, joining the
process group, ranks agreeing) and the sharding of the float model before capture (shard.py). The all-reduce
is the declared op zq.all_reduce (zqcompile/ops/library.py). docs/architecture.md says why the model is sharded
before capture and what differs from a single process."""
from zqcompile.parallel.group import Rank, TensorParallel, agree, join
from zqcompile.parallel.shard import RowParallelLinear, check_shardable, shard_model

__all__ = ["Rank", "RowParallelLinear", "TensorParallel", "agree", "check_shardable", "join", "shard_model"]
