"""What one torchtitan checkpoint stores, and putting it back.

torchtitan hands DCP a flat dict: the model's FQN-keyed tensors (DTensors under
FSDP2/TP) beside ``Stateful`` objects (``optimizer``, ``lr_scheduler``,
``dataloader``, ``train_state``). DCP calls ``state_dict()`` on the Stateful ones
and ``load_state_dict()`` after loading; so does this module.

Values without tensors may differ per rank (the dataloader's state is keyed
``dp_rank_N`` and holds that rank's position) while shardckpt requires
replicated values to agree, so they are all-gathered and stored as
``{PER_RANK_KEY: [rank 0's, rank 1's, ...]}``; each rank gets its own back at the
same world size, and at another one only a value every rank had the same.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from ..collectives import Group
from ..errors import CheckpointMismatchError, ShardckptError
from ..integrations import (
    holds_tensor,
    load_tree,
    read_manifest,
    skeleton_of,
    stored_shapes,
    subtree,
)

__all__ = ["PER_RANK_KEY", "StateReshardWarning", "collect", "restore"]

#: Marks a value stored once per rank (a list indexed by the saving rank).
PER_RANK_KEY = "shardckpt.per_rank"

StorageOptions = Mapping[str, Any] | None


class StateReshardWarning(UserWarning):
    """A per-rank state (the dataloader's position) saved at another world size was not restored."""


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collect(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The tree to save for torchtitan's ``state_dict`` (collective: per-rank values are gathered)."""
    out: dict[str, Any] = {}
    local: dict[str, Any] = {}
    for key, value in state_dict.items():
        sd = value.state_dict() if isinstance(value, Stateful) else value
        (out if holds_tensor(sd) else local)[key] = sd
    gathered = Group(None).all_gather("gathering every rank's torchtitan states", lambda: local, ShardckptError)
    for key in local:
        out[key] = {PER_RANK_KEY: [g.get(key) for g in gathered]}
    return out


def _stored_keys(skeleton: Any) -> list[str]:
    ((_, body),) = skeleton.items()
    return [str(k) for k, _ in body]


def _check_fit(manifest: Any, path: str, state_dict: Mapping[str, Any]) -> None:
    """Every key torchtitan asks for is stored, and every model tensor has its stored
    shape: checked from the manifest before any data is read."""
    skeleton = skeleton_of(manifest, path)
    stored = set(_stored_keys(skeleton))
    missing = sorted(k for k in state_dict if k not in stored)
    if missing:
        raise CheckpointMismatchError(
            f"{path} does not fit this run: {', '.join(repr(k) for k in missing[:10])} "
            f"{'is' if len(missing) == 1 else 'are'} not in the checkpoint (another model's checkpoint, "
            "or a model-only one loaded with the training state)",
            missing=missing, unexpected=[], mismatched={}, key=missing[0], path=path)
    shapes = stored_shapes(manifest, skeleton)
    mismatched = {k: f"shape {list(shapes[k]) if shapes[k] is not None else 'non-tensor'} in the checkpoint, "
                     f"{list(v.shape)} in the model"
                  for k, v in state_dict.items() if isinstance(v, torch.Tensor) and shapes.get(k) != tuple(v.shape)}
    if mismatched:
        first = sorted(mismatched)[0]
        raise CheckpointMismatchError(
            f"{path} does not fit this model: " + "; ".join(f"{k!r}: {why}" for k, why in sorted(mismatched.items())),
            missing=[], unexpected=[], mismatched=mismatched, key=first, path=path)


def _pick(key: str, stored: Any, path: str) -> tuple[bool, Any]:
    """(whether to restore, the value) of one loaded top-level item."""
    if not (isinstance(stored, Mapping) and PER_RANK_KEY in stored):
        return True, stored
    per_rank = list(stored[PER_RANK_KEY])
    rank, world = _world()
    if len(per_rank) == world:
        return True, per_rank[rank]
    if all(v == per_rank[0] for v in per_rank):
        return True, per_rank[0]
    # A dataloader's position is its own rank's share of the data: meaningless at another world size.
    warnings.warn(f"{path}: {key!r} was saved per rank at world size {len(per_rank)}; at {world} it is "
                  "not restored (a dataloader starts its data afresh)", StateReshardWarning, stacklevel=3)
    return False, None


def restore(state_dict: dict[str, Any], path: str, storage_options: StorageOptions = None) -> None:
    """Load the checkpoint at ``path`` into torchtitan's ``state_dict`` as ``dcp.load``
    does: tensors in place (resharded), Stateful objects through ``load_state_dict``,
    other values replaced. Collective; every chunk's CRC32C is checked."""
    path = os.fspath(path)
    manifest = read_manifest(path, storage_options)
    _check_fit(manifest, path, state_dict)
    skeleton = skeleton_of(manifest, path)
    live: dict[str, Any] = {}
    for key, value in state_dict.items():
        sd = value.state_dict() if isinstance(value, Stateful) else value
        if holds_tensor(sd) and subtree(skeleton, key) is not None:
            live[key] = sd
    # keys torchtitan did not ask for (exclude_from_loading, a model-only load) are not read
    skip = tuple(k for k in _stored_keys(skeleton) if k not in state_dict)
    loaded = load_tree(path, live=live, manifest=manifest, skip=skip, storage_options=storage_options)
    for key, value in state_dict.items():
        ok, got = _pick(key, loaded[key], path)
        if not ok:
            continue
        if isinstance(value, Stateful):
            value.load_state_dict(got)
        elif not isinstance(value, torch.Tensor):
            state_dict[key] = got
