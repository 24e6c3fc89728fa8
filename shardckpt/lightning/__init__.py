"""shardckpt inside PyTorch Lightning (``lightning.pytorch`` or ``pytorch_lightning`` 2.x).

>>> from shardckpt.lightning import ShardckptCheckpointIO, latest
>>> trainer = Trainer(plugins=[ShardckptCheckpointIO()], callbacks=[ModelCheckpoint(dirpath="ckpts")])
>>> trainer.fit(model, ckpt_path=latest("ckpts"))   # the newest valid checkpoint, or a fresh start

Single-device and DDP runs: ``ShardckptCheckpointIO`` (a ``CheckpointIO`` plugin).
Sharded runs: ``ShardckptFSDPStrategy`` / ``ShardckptModelParallelStrategy`` in
place of Lightning's (they bypass ``CheckpointIO``). Loading outside a trainer:
``load_checkpoint(path)`` (the dict) and ``load_from_checkpoint(Model, path)``.

An entry point: imports ``shardckpt.integrations`` and what lies below it.
"""

from __future__ import annotations

from .checkpoint_io import ShardckptCheckpointIO, latest, load_checkpoint, load_from_checkpoint
from .strategies import ShardckptFSDPStrategy, ShardckptModelParallelStrategy

__all__ = [
    "ShardckptCheckpointIO",
    "ShardckptFSDPStrategy",
    "ShardckptModelParallelStrategy",
    "latest",
    "load_checkpoint",
    "load_from_checkpoint",
]
