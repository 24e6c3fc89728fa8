"""What an MMEngine checkpoint holds, in a form shardckpt stores without pickled code,
and back; reading MMEngine's own ``.pth`` files without running code from them.

MMEngine's checkpoint dict (``Runner.save_checkpoint``): ``meta`` (epoch, iter, seed,
cfg text, dataset meta, ...), ``state_dict``, ``message_hub`` (its ``log_scalars`` are
``HistoryBuffer`` objects holding numpy arrays), ``optimizer``, ``param_schedulers``
and whatever ``before_save_checkpoint`` hooks add (``EMAHook``: ``ema_state_dict``).
``HistoryBuffer`` and numpy values are not loadable with ``weights_only=True``, which
is why MMEngine's own ``resume`` fails on torch >= 2.6; here they are stored as
tagged dicts of tensors and plain values (``to_storable``) and rebuilt on load
(``from_storable``), so nothing is ever unpickled unrestricted.
"""

from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from mmengine.logging import HistoryBuffer
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper

from ..converters.source_files import load_pickled
from ..errors import CheckpointMismatchError, UnsupportedFormatError

__all__ = ["TAG", "to_storable", "from_storable", "collect", "unwrap", "load_pth", "check_fit", "revised"]

#: The key marking a dict that stands for a value weights-only loading refuses.
TAG = "__shardckpt_mmengine__"


def _tagged(kind: str, **fields: Any) -> dict[str, Any]:
    return {TAG: kind, **fields}


def to_storable(value: Any) -> Any:
    """``value`` with every ``HistoryBuffer``, numpy array and numpy scalar replaced by
    a tagged dict of tensors and plain values (containers keep their types)."""
    if isinstance(value, HistoryBuffer):
        log, count = value.data
        return _tagged("HistoryBuffer", log=torch.from_numpy(np.array(log)),
                       count=torch.from_numpy(np.array(count)), max_length=int(value.max_length))
    if isinstance(value, np.ndarray) and value.dtype != object:
        return _tagged("ndarray", value=torch.from_numpy(np.ascontiguousarray(value).copy()))
    if isinstance(value, np.generic):
        return _tagged("npscalar", value=value.item(), dtype=str(value.dtype))
    if isinstance(value, OrderedDict):
        return OrderedDict((k, to_storable(v)) for k, v in value.items())
    if isinstance(value, dict):
        return {k: to_storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_storable(v) for v in value) if type(value) in (list, tuple) else value
    return value


def from_storable(value: Any) -> Any:
    """The inverse of ``to_storable``."""
    if isinstance(value, Mapping) and TAG in value:
        kind = value[TAG]
        if kind == "HistoryBuffer":
            return HistoryBuffer(value["log"].numpy(), value["count"].numpy(), value["max_length"])
        if kind == "ndarray":
            return value["value"].numpy()
        if kind == "npscalar":
            return np.dtype(value["dtype"]).type(value["value"])
        raise UnsupportedFormatError(f"unknown stored MMEngine value kind {kind!r}")
    if isinstance(value, OrderedDict):
        return OrderedDict((k, from_storable(v)) for k, v in value.items())
    if isinstance(value, dict):
        return {k: from_storable(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(from_storable(v) for v in value)
    return value


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside MMEngine's DDP/FSDP wrapper."""
    return model.module if is_model_wrapper(model) else model


def _schedulers(runner: Any) -> Any:
    scheds = runner.param_schedulers
    if isinstance(scheds, dict):
        return {name: [s.state_dict() for s in group] for name, group in scheds.items()}
    return [s.state_dict() for s in scheds]


def collect(runner: Any, meta: dict[str, Any], save_optimizer: bool, save_param_scheduler: bool) -> dict[str, Any]:
    """The checkpoint dict ``Runner.save_checkpoint`` builds (hooks' additions included),
    tensors left where they are: shardckpt stages them itself."""
    import mmengine

    meta = dict(meta)
    meta.update(cfg=runner.cfg.pretty_text, seed=runner.seed, experiment_name=runner.experiment_name,
                mmengine_version=mmengine.__version__)
    dataset = getattr(getattr(runner, "train_dataloader", None), "dataset", None)
    if hasattr(dataset, "metainfo"):
        meta.update(dataset_meta=dataset.metainfo)
    checkpoint: dict[str, Any] = {"meta": meta, "state_dict": unwrap(runner.model).state_dict(),
                                  "message_hub": runner.message_hub.state_dict()}
    if save_optimizer:
        if not isinstance(runner.optim_wrapper, OptimWrapper):  # OptimWrapperDict is one too
            raise TypeError(f"runner.optim_wrapper should be an OptimWrapper or OptimWrapperDict, "
                            f"got {type(runner.optim_wrapper).__name__}")
        checkpoint["optimizer"] = runner.optim_wrapper.state_dict()
    if save_param_scheduler and runner.param_schedulers is not None:
        checkpoint["param_schedulers"] = _schedulers(runner)
    # EMAHook adds ema_state_dict (and swaps the averaged weights into state_dict) here
    runner.call_hook("before_save_checkpoint", checkpoint=checkpoint)
    return _rank0_logs(to_storable(checkpoint))


def _rank0_logs(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``meta`` and ``message_hub`` as rank 0 has them, on every rank. MMEngine saves on
    rank 0 only, so its checkpoint holds rank 0's loss history and times; shardckpt's
    save is collective and refuses replicated items that differ between ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return checkpoint
    logs = [{k: checkpoint[k] for k in ("meta", "message_hub")}]
    dist.broadcast_object_list(logs, src=0)  # pickled in flight only, never loaded from storage
    return {**checkpoint, **logs[0]}


_HISTORY_METHODS = ("min", "max", "current", "mean")


def _history_method(obj: Any, name: str) -> Any:
    """Stands in for ``builtins.getattr`` while a ``.pth`` loads. A ``HistoryBuffer``'s
    pickled ``statistics_methods`` names its own methods as ``getattr(HistoryBuffer,
    "min")``; allowing getattr itself would let a file reach any attribute of any
    allowed object, so only those four lookups are answered."""
    if obj is HistoryBuffer and name in _HISTORY_METHODS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f"refused global builtins.getattr({obj!r}, {name!r}): only "
                                 f"HistoryBuffer's {', '.join(_HISTORY_METHODS)} are allowed")


def _safe_globals() -> list[Any]:
    """What an MMEngine ``.pth`` pickles beyond tensors that is plain data: a
    ``HistoryBuffer`` (rebuilt from its attributes, no code of its own runs), its
    statistics methods, and numpy arrays and scalars."""
    found: list[Any] = [HistoryBuffer, np.ndarray, np.dtype, (_history_method, "builtins.getattr")]
    core = getattr(np, "_core", None) or np.core
    found += [core.multiarray._reconstruct, core.multiarray.scalar]
    found += [t for t in vars(np.dtypes).values() if isinstance(t, type) and issubclass(t, np.dtype)]
    return found


def load_pth(path: str | os.PathLike[str]) -> dict[str, Any]:
    """An MMEngine ``torch.save`` checkpoint, loaded with ``weights_only=True`` (only
    tensors, plain values, ``HistoryBuffer`` and numpy data allowed). A file needing any
    other pickled class raises ``UnsupportedFormatError`` naming the refused global."""
    where = os.fspath(path)
    with torch.serialization.safe_globals(_safe_globals()):
        obj = load_pickled(where, where, trust_pickle=False)
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise UnsupportedFormatError(f"{where} is not an MMEngine checkpoint (no 'state_dict')", path=where,
                                     key="state_dict")
    return obj


def revised(names: list[str], revise_keys: list[tuple[str, str]]) -> dict[str, str]:
    """Stored name -> name after MMEngine's ``revise_keys`` (default: strip ``module.``)."""
    out = {}
    for name in names:
        new = name
        for pattern, repl in revise_keys:
            new = re.sub(pattern, repl, new)
        out[name] = new
    return out


def check_fit(path: str, stored: Mapping[str, tuple[int, ...] | None], model: torch.nn.Module,
              revise_keys: list[tuple[str, str]], strict: bool) -> None:
    """Raise ``CheckpointMismatchError`` naming ``path`` and the first key where the stored
    weights (name -> shape) do not fit ``model``: a shape differs, or (``strict``) a key
    is on one side only."""
    names = revised(list(stored), revise_keys)
    have = {names[k]: shape for k, shape in stored.items()}
    live = unwrap(model).state_dict()
    mismatched = {k: f"shape {list(have[k]) if have[k] is not None else 'non-tensor'} in the checkpoint, "
                     f"{list(v.shape)} in the model"
                  for k, v in live.items() if isinstance(v, torch.Tensor) and k in have and have[k] != tuple(v.shape)}
    missing = sorted(set(live) - set(have)) if strict else []
    unexpected = sorted(set(have) - set(live)) if strict else []
    if mismatched or missing or unexpected:
        parts = [f"{k!r}: {why}" for k, why in sorted(mismatched.items())]
        parts += [f"{k!r} missing from the checkpoint" for k in missing[:10]]
        parts += [f"{k!r} not in the model" for k in unexpected[:10]]
        first = next(iter(sorted(mismatched) or missing or unexpected))
        raise CheckpointMismatchError(f"{path} does not fit this model (state_dict): " + "; ".join(parts),
                                      missing=missing, unexpected=unexpected, mismatched=mismatched,
                                      key=f"state_dict.{first}", path=path)
