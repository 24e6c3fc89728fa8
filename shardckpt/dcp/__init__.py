"""Thin adapters between torch.distributed.checkpoint and shardckpt's format:
``ShardckptWriter`` (a ``StorageWriter`` driving ``io.SaveTarget``),
``ShardckptReader`` (a ``StorageReader`` over ``io.ShardReader``) and
``SafeLoadPlanner`` (whole-state_dict checks, no unpickling with code).

``torch.distributed.checkpoint.save(sd, storage_writer=ShardckptWriter(path))`` and
``load(sd, storage_reader=ShardckptReader(path))`` read and write the same
checkpoints as ``shardckpt.save`` / ``shardckpt.load``.

May import: ``io``, ``store``, ``format``, ``backends``, ``collectives``,
``compat``, ``errors``, ``knobs``; never ``engine`` (the engine uses these).
"""

from .planner import SafeLoadPlanner
from .reader import ShardckptReader
from .writer import ShardckptWriter

__all__ = ["ShardckptWriter", "ShardckptReader", "SafeLoadPlanner"]
