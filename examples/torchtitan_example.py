"""torchtitan with shardckpt checkpoints: a config module for torchtitan's launcher.

    torchrun --nproc-per-node 8 -m torchtitan.train \
        --module examples.torchtitan_example --config llama3_debugmodel_shardckpt \
        --checkpoint.enable --checkpoint.interval 500

Every ``--checkpoint.*`` option keeps its meaning; resume picks the newest
checkpoint that verifies. Needs torchtitan's full install (its config registry
imports the trainer, which imports ``datasets``).
"""

from __future__ import annotations

from torchtitan.models.llama3.config_registry import llama3_debugmodel

from shardckpt.torchtitan import use_shardckpt

__all__ = ["llama3_debugmodel_shardckpt"]


def llama3_debugmodel_shardckpt():
    """torchtitan's llama3 debug config, checkpointing through shardckpt."""
    return use_shardckpt(llama3_debugmodel(), enable=True, last_save_model_only=False)
