"""Adapters that plug shardckpt's format into torch.distributed.checkpoint.

``torch.distributed.checkpoint.save(sd, storage_writer=ShardckptWriter(path))`` and
``load(sd, storage_reader=ShardckptReader(path))`` read and write the same
checkpoints as ``shardckpt.save`` / ``shardckpt.load``; DCP's planner decides who
writes and reads which slice (deduplication of replicas, resharding).
"""

from .planner import SafeLoadPlanner
from .reader import ShardckptReader
from .writer import ShardckptWriter

__all__ = ["ShardckptWriter", "ShardckptReader", "SafeLoadPlanner"]
