"""What one ``checkpoint-<step>`` holds, and putting it back: the tree
``ShardckptTrainer`` saves with ``shardckpt.integrations.save_tree``::

    {"model":        the model's state_dict (DDP: the unwrapped module's, written once
                     for all replicas; FSDP: sharded DTensors, resharded on load),
     "optimizer":    its state_dict (FSDP: keyed by parameter name, sharded),
     "scheduler":    the LR scheduler's state_dict,
     "scaler":       the gradient scaler's state_dict, when there is one,
     "rng":          [every process's RNG state, indexed by rank],
     "data":         {"global_step", "epoch", "world_size"}: where the data stood}

TrainerState (the JSON text Trainer writes to trainer_state.json: log history,
best-model tracking, callback states) rides in the manifest's metadata under
``META_KEY``, so a resume reads it (checksummed) before any tensor.

Optimizer, scheduler, scaler and RNG are left out under ``save_only_model``, as
Trainer does. The data position itself is what Trainer derives from
``TrainerState.global_step`` (epochs done, batches to skip), so restoring the
state restores it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from transformers import Trainer, TrainerState

from ..state.rng import gather_rng_states, rng_state_for_rank, set_rng_state

__all__ = ["META_KEY", "build_tree", "model_state", "optimizer_state", "restore_sharded", "restore_rng", "trainer_state_json",
           "trainer_state_from_json", "live_targets", "is_sharded"]


#: The manifest metadata key of what Trainer keeps beside the tensors.
META_KEY = "shardckpt.transformers"


def _sharded(trainer: Trainer) -> bool:
    """FSDP as Trainer runs it (Accelerate's plugin): tensors are DTensors that
    every rank holds a piece of, saved and loaded through torch's state_dict API."""
    return bool(getattr(trainer, "is_fsdp_enabled", False))


def model_state(trainer: Trainer) -> dict[str, Any]:
    """The model's state_dict as stored: the plain module's, or FSDP's sharded one."""
    if _sharded(trainer):
        return get_model_state_dict(trainer.model_wrapped, options=StateDictOptions(full_state_dict=False))
    return trainer.model.state_dict()


def optimizer_state(trainer: Trainer) -> dict[str, Any]:
    """The optimizer's state_dict as stored (FSDP: keyed by parameter name, sharded)."""
    if _sharded(trainer):
        return get_optimizer_state_dict(trainer.model_wrapped, trainer.optimizer,
                                        options=StateDictOptions(full_state_dict=False))
    return trainer.optimizer.state_dict()


def trainer_state_json(trainer: Trainer) -> str:
    """Rank 0's TrainerState as the JSON Trainer writes: ranks differ in
    ``is_world_process_zero``, and the stored copy must be one value."""
    text = json.dumps(dataclasses.asdict(trainer.state), indent=2) + "\n"
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [text]
        dist.broadcast_object_list(box, src=0)
        text = box[0]
    return text


def trainer_state_from_json(text: str) -> TrainerState:
    """TrainerState from the stored JSON text (as ``TrainerState.load_from_json``)."""
    return TrainerState(**json.loads(text))


def _scaler_state(trainer: Trainer) -> dict[str, Any] | None:
    scaler = getattr(trainer.accelerator, "scaler", None)
    return scaler.state_dict() if scaler is not None else None


def build_tree(trainer: Trainer) -> dict[str, Any]:
    """[all] The checkpoint of ``trainer`` now. Collective (RNG states, the state
    JSON and FSDP's state dicts gather over the default group)."""
    tree: dict[str, Any] = {"model": model_state(trainer)}
    if not trainer.args.save_only_model:
        tree["optimizer"] = optimizer_state(trainer)
        tree["scheduler"] = trainer.lr_scheduler.state_dict() if trainer.lr_scheduler is not None else None
        tree["scaler"] = _scaler_state(trainer)
        tree["rng"] = list(gather_rng_states())
    tree["data"] = {"global_step": int(trainer.state.global_step), "epoch": float(trainer.state.epoch or 0.0),
                    "world_size": int(trainer.args.world_size)}
    return tree


def restore_sharded(trainer: Trainer, tree: dict[str, Any]) -> None:
    """FSDP: put the loaded (already resharded in place) model and optimizer states back."""
    set_model_state_dict(trainer.model_wrapped, tree["model"], options=StateDictOptions(full_state_dict=False))
    if tree.get("optimizer") is not None and trainer.optimizer is not None:
        set_optimizer_state_dict(trainer.model_wrapped, trainer.optimizer, tree["optimizer"],
                                 options=StateDictOptions(full_state_dict=False))


def restore_rng(tree: dict[str, Any]) -> None:
    """This rank's RNG streams from the stored per-rank states (another world size:
    ``shardckpt.state.rng``'s rule, with a ``RngReshardWarning``)."""
    saved = tree.get("rng")
    if not saved:
        return
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    set_rng_state(rng_state_for_rank(saved, rank, world))


def live_targets(trainer: Trainer, with_optimizer: bool) -> dict[str, Any]:
    """Tensors a load fills in place: the model's (no second copy of the weights),
    and under FSDP the optimizer's sharded state (so both reshard to this world)."""
    live: dict[str, Any] = {"model": model_state(trainer)}
    if with_optimizer and _sharded(trainer) and trainer.optimizer is not None:
        live["optimizer"] = optimizer_state(trainer)
    return live


def is_sharded(trainer: Trainer) -> bool:
    """Whether ``trainer`` runs FSDP (its checkpoints hold sharded DTensors)."""
    return _sharded(trainer)

