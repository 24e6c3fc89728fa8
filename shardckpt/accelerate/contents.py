"""What one Accelerate checkpoint holds, as one tree, and putting it back.

The tree (``collect``) is what ``accelerator.save_state()`` writes as separate
files, in one dict::

    {"models": [state_dict, ...],        unwrapped (no "module." prefix), so a DDP
                                         checkpoint loads at one process too; FSDP2:
                                         sharded DTensors (get_model_state_dict)
     "optimizers": [state_dict, ...],    FSDP2: get_optimizer_state_dict (by FQN)
     "schedulers": [state_dict, ...],
     "scaler": state_dict | None,
     "custom": [state_dict, ...],        objects given to register_for_checkpointing (rank 0's)
     "dataloaders": [{"iteration", "sampler": {"epoch", "initial_seed"} | None}, ...],
     "step": accelerator.step,
     "processes": [{"rng": RngState, "loaders": [state_dict | None, ...]}, ...]}

``processes`` is every rank's own state (RNG streams and, with
``use_stateful_dataloader``, each dataloader's position),
all-gathered so that every rank saves the same value (shardckpt checks that
replicated items agree) and a rank at another world size can pick its own.

Accelerate keeps the prepared objects in private lists (``_models``, ...); they
are read in ``Prepared.of`` only, the one place that knows those names.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..collectives import Group
from ..errors import CheckpointMismatchError, ShardckptError
from ..state.rng import RngReshardWarning, get_rng_state, rng_state_for_rank, set_rng_state

__all__ = ["Prepared", "collect", "restore_extras", "restore_models", "restore_optimizers", "live_tree", "model_states",
           "LoaderReshardWarning"]


class LoaderReshardWarning(UserWarning):
    """A stateful dataloader's per-process position was not restored (world size changed)."""


@dataclass(frozen=True)
class Prepared:
    """The objects an Accelerator checkpoints, in its own order."""

    models: list[Any]
    optimizers: list[Any]
    schedulers: list[Any]
    dataloaders: list[Any]
    custom: list[Any]
    fsdp2: bool

    @classmethod
    def of(cls, accelerator: Any) -> Prepared:
        from accelerate.utils import DistributedType

        kind = accelerator.distributed_type
        if kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA) or (
                kind == DistributedType.FSDP and not accelerator.is_fsdp2):
            # Those engines checkpoint through their own files (DeepSpeed's, Megatron's) or FSDP1's
            # state-dict types; only DDP-like runs and FSDP2's DTensors have a state_dict shardckpt reshards.
            raise ValueError(f"shardckpt.accelerate supports DDP-like runs and FSDP2 (fsdp_version=2), not "
                             f"{kind}{' with fsdp_version=1' if kind == DistributedType.FSDP else ''}; "
                             "use accelerator.save_state() there")
        return cls(models=list(accelerator._models), optimizers=list(accelerator._optimizers),
                   schedulers=list(accelerator._schedulers), dataloaders=list(accelerator._dataloaders),
                   custom=list(accelerator._custom_objects), fsdp2=bool(accelerator.is_fsdp2))


# ----------------------------------------------------------------------------- models and optimizers


def model_states(accelerator: Any, prep: Prepared) -> list[dict[str, Any]]:
    """Each model's state_dict as stored: unwrapped (DDP), or sharded DTensors (FSDP2)."""
    if prep.fsdp2:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return [get_model_state_dict(m) for m in prep.models]
    return [accelerator.unwrap_model(m).state_dict() for m in prep.models]


def _optimizer_states(prep: Prepared) -> list[dict[str, Any]]:
    if prep.fsdp2:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        # Accelerate pairs the i-th optimizer with the i-th model under FSDP (save_fsdp_optimizer).
        return [get_optimizer_state_dict(prep.models[i], _inner(o)) for i, o in enumerate(prep.optimizers)]
    return [o.state_dict() for o in prep.optimizers]


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # AcceleratedOptimizer wraps the torch one


def live_tree(accelerator: Any, prep: Prepared) -> dict[str, Any] | None:
    """The live tensors a load fills in place: FSDP2's DTensors (resharded as read).
    DDP loads into fresh tensors and then ``load_state_dict`` (that casts devices)."""
    if not prep.fsdp2:
        return None
    return {"models": model_states(accelerator, prep), "optimizers": _optimizer_states(prep)}


def restore_models(prep: Prepared, states: list[Any], path: str) -> None:
    """Put each stored model state back (strict: every key was checked before reading)."""
    _same_count("models", len(prep.models), len(states), path)
    for model, sd in zip(prep.models, states):
        if prep.fsdp2:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(model, sd)
        else:
            target = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
            target.load_state_dict(sd)


def restore_optimizers(prep: Prepared, states: list[Any], path: str) -> None:
    """Put each optimizer's state back; a state of another parameter layout is a typed error."""
    _same_count("optimizers", len(prep.optimizers), len(states), path)
    for i, (opt, sd) in enumerate(zip(prep.optimizers, states)):
        try:
            if prep.fsdp2:
                from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

                set_optimizer_state_dict(prep.models[i], _inner(opt), sd)
            else:
                opt.load_state_dict(sd)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointMismatchError(
                f"{path}: optimizers.{i} does not fit this optimizer: {e}", missing=[], unexpected=[],
                mismatched={f"optimizers.{i}": str(e)}, key=f"optimizers.{i}", path=path) from e


def _same_count(what: str, have: int, stored: int, path: str) -> None:
    if have != stored:
        raise CheckpointMismatchError(
            f"{path} holds {stored} {what}, this Accelerator prepared {have}", missing=[], unexpected=[],
            mismatched={what: f"{stored} stored, {have} prepared"}, key=what, path=path)


# ----------------------------------------------------------------------------- data loaders


def _sampler(dl: Any) -> Any:
    """The dataloader's SeedableRandomSampler (its epoch seeds the shuffle), if it has one."""
    from accelerate.data_loader import SeedableRandomSampler

    todo, seen = [dl], set()
    while todo:  # DataLoaderShard -> BatchSamplerShard -> BatchSampler -> sampler, a few levels
        s = todo.pop()
        if s is None or id(s) in seen:
            continue
        seen.add(id(s))
        if isinstance(s, SeedableRandomSampler):
            return s
        todo += [getattr(s, "sampler", None), getattr(s, "batch_sampler", None)]
    return None


def _loader_state(dl: Any) -> dict[str, Any]:
    s = _sampler(dl)
    return {"iteration": int(getattr(dl, "iteration", 0)),
            "sampler": None if s is None else {"epoch": int(s.epoch), "initial_seed": int(s.initial_seed)}}


def _loader_process_state(dl: Any) -> dict[str, Any] | None:
    return dl.state_dict() if getattr(dl, "use_stateful_dataloader", False) else None


def _process_state(prep: Prepared) -> dict[str, Any]:
    return {"rng": get_rng_state(), "loaders": [_loader_process_state(dl) for dl in prep.dataloaders]}


def _restore_loaders(prep: Prepared, shared: list[Any], mine: dict[str, Any] | None, path: str) -> None:
    _same_count("dataloaders", len(prep.dataloaders), len(shared), path)
    for i, (dl, st) in enumerate(zip(prep.dataloaders, shared)):
        if hasattr(dl, "iteration"):
            dl.iteration = int(st["iteration"])
        s = _sampler(dl)
        if s is not None and st["sampler"] is not None:
            s.epoch, s.initial_seed = int(st["sampler"]["epoch"]), int(st["sampler"]["initial_seed"])
        if mine is None:
            continue
        own = mine["loaders"][i]
        if own is not None and getattr(dl, "use_stateful_dataloader", False):
            dl.load_state_dict(own)


# ----------------------------------------------------------------------------- the whole tree


def collect(accelerator: Any, prep: Prepared) -> dict[str, Any]:
    """The tree one checkpoint stores (collective: every rank's process state is gathered)."""
    processes = Group(None).all_gather("gathering every process's RNG and data position",
                                       lambda: _process_state(prep), ShardckptError)
    group = Group(None)
    # Registered objects may differ per rank (a rank's own losses); Accelerate stores the main
    # process's copy and every rank loads it. Same here: rank 0's, sent to all, so replicas agree.
    custom = group.gather_broadcast("sending the main process's registered objects",
                                    lambda: [o.state_dict() for o in prep.custom] if group.is_coordinator else None,
                                    lambda vals: vals[0], ShardckptError)
    scaler = getattr(accelerator, "scaler", None)
    return {
        "models": model_states(accelerator, prep),
        "optimizers": _optimizer_states(prep),
        "schedulers": [s.state_dict() for s in prep.schedulers],
        "scaler": scaler.state_dict() if scaler is not None else None,
        "custom": custom,
        "dataloaders": [_loader_state(dl) for dl in prep.dataloaders],
        "step": int(accelerator.step),
        "processes": processes,
    }


def restore_extras(accelerator: Any, prep: Prepared, tree: Mapping[str, Any], path: str) -> None:
    """Everything but models and optimizers: schedulers, scaler, registered objects,
    dataloaders, the step counter, and this process's RNG (last: nothing after it draws)."""
    _same_count("schedulers", len(prep.schedulers), len(tree["schedulers"]), path)
    for sched, sd in zip(prep.schedulers, tree["schedulers"]):
        sched.load_state_dict(sd)
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and tree["scaler"] is not None:
        scaler.load_state_dict(tree["scaler"])
    _same_count("registered objects", len(prep.custom), len(tree["custom"]), path)
    for obj, sd in zip(prep.custom, tree["custom"]):
        obj.load_state_dict(sd)
    saved = list(tree["processes"])
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    same_world = world == len(saved)
    if not same_world and any(own is not None for p in saved for own in p["loaders"]):
        warnings.warn(f"{path}: stateful dataloader positions were saved per process at world size "
                      f"{len(saved)}; at {world} they start their epoch afresh", LoaderReshardWarning,
                      stacklevel=3)
    # A stateful loader's position is its own rank's share of the data: meaningless at another world size.
    mine = saved[rank] if same_world else None
    _restore_loaders(prep, list(tree["dataloaders"]), mine, path)
    accelerator.step = int(tree["step"])
    with warnings.catch_warnings():
        if same_world:
            warnings.simplefilter("ignore", RngReshardWarning)
        set_rng_state(rng_state_for_rank([p["rng"] for p in saved], rank, world))
