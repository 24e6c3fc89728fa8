"""shardckpt inside torchtitan (0.3.x): a checkpoint manager that replaces
torchtitan's DCP calls with shardckpt's (manifest committed last, CRC32C on
every chunk, loadable at another number of processes), selected by
configuration only, keeping every ``checkpoint.*`` option::

    # my_config.py, passed as --module my_config --config llama3_shardckpt
    from torchtitan.models.llama3.config_registry import llama3_debugmodel
    from shardckpt.torchtitan import use_shardckpt

    def llama3_shardckpt():
        return use_shardckpt(llama3_debugmodel())

Resume (``checkpoint.enable``, ``load_step=-1``) picks the newest checkpoint that
verifies, skipping torn and corrupt ones with a ``SkippedCheckpointWarning``.

An entry point: may import ``integrations``, ``api``, ``store`` and everything
below them. Needs torchtitan: ``pip install "shardckpt[torchtitan]"``.
"""

from __future__ import annotations

try:
    import torchtitan.components.checkpointer as _checkpointer  # noqa: F401 - fail early with the hint
except ImportError as e:  # pragma: no cover - exercised in a process without torchtitan
    raise ImportError('shardckpt.torchtitan needs torchtitan: pip install "shardckpt[torchtitan]" '
                      f"(importing it failed: {e})") from e

from ..integrations import SkippedCheckpointWarning
from .contents import PER_RANK_KEY, StateReshardWarning
from .manager import STEP_PATTERN, ShardckptCheckpointManager, shardckpt_config, use_shardckpt

__all__ = ["ShardckptCheckpointManager", "shardckpt_config", "use_shardckpt", "STEP_PATTERN", "PER_RANK_KEY",
           "StateReshardWarning", "SkippedCheckpointWarning"]
