"""shardckpt: distributed sharded checkpointing for PyTorch.

>>> import shardckpt
>>> shardckpt.save(state_dict, "ckpts/step_100")
>>> shardckpt.load(state_dict, "ckpts/step_100")   # reshards to the current world size
>>> shardckpt.verify("ckpts/step_100")             # checks every chunk's CRC32C and decoding
>>> shardckpt.convert("ckpts/step_100", "model.safetensors", only="state.model")
"""

__version__ = "0.1.0"

from . import knobs
from .api import VerifyReport, async_save, close, load, save, verify
from .converters import ConvertReport, convert
from .dcp import SafeLoadPlanner, ShardckptReader, ShardckptWriter
from .engine.async_save import AsyncCheckpointer, AsyncSaveHandle
from .engine.replicas import ReplicaDivergenceWarning
from .errors import (
    CheckpointExistsError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointWriteError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    SaveInProgressError,
    ShardckptError,
    UnsupportedFormatError,
)
from .format.codec import Compression
from .manager.checkpoint_manager import CheckpointManager
from .manager.preemption import run_and_exit
from .state import ResumableSampler, TrainState
from .store.retention import CheckpointInfo, KeepBest, KeepEvery, KeepLast, RetentionPolicy

__all__ = [
    "save",
    "async_save",
    "close",
    "AsyncCheckpointer",
    "AsyncSaveHandle",
    "load",
    "verify",
    "VerifyReport",
    "knobs",
    "TrainState",
    "ResumableSampler",
    "CheckpointManager",
    "run_and_exit",
    "CheckpointInfo",
    "RetentionPolicy",
    "KeepLast",
    "KeepEvery",
    "KeepBest",
    "Compression",
    "ShardckptWriter",
    "ShardckptReader",
    "SafeLoadPlanner",
    "SaveInProgressError",
    "ShardckptError",
    "CheckpointNotFoundError",
    "IncompleteCheckpointError",
    "CorruptCheckpointError",
    "CheckpointMismatchError",
    "CheckpointExistsError",
    "CheckpointWriteError",
    "CheckpointReadError",
    "UnsupportedFormatError",
    "ReplicaDivergenceWarning",
    "convert",
    "ConvertReport",
]
