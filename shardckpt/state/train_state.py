"""``TrainState``: everything a resumed training run needs, as one DCP ``Stateful``.

What is stored under which key of ``TrainState.state_dict()`` (DCP flattens the
nested dicts; ``shardckpt.save`` / ``load`` call ``state_dict`` and
``load_state_dict`` themselves):

============  =====================================================================
key           value
============  =====================================================================
model         ``get_state_dict`` of the model (plain module, DDP, FSDP2): tensors or
              DTensors, resharded by DCP on load
optimizer     the optimizer(s)' state, FQN-keyed by ``get_state_dict``
scheduler     the LR scheduler's ``state_dict()``
scaler        JSON text ``{"enabled", "state"}`` of the GradScaler (its state is
              empty when disabled, so it is one opaque value rather than keys that
              would come and go)
sampler       the sampler's ``state_dict()`` (``ResumableSampler``: global position)
objects       ``{name: obj.state_dict()}`` for the extra keyword ``Stateful`` objects
progress      ``{"step", "epoch"}``
extra, config JSON text of the user's dicts (one value each, so keys may change
              between runs without breaking a strict load)
env           JSON text: versions, world size, hostnames, time; stored, never restored
rng           a tuple (one leaf value) of every rank's ``RngState``, gathered with
              ``all_gather_object``: identical on every rank, so written once
============  =====================================================================

RNG restore rule (see ``shardckpt.state.rng``): same world size → every rank gets
exactly its own saved state; changed world size → ``RngReshardWarning``, rank ``r``
gets saved rank ``r``'s state if ``r`` < the saved world size, else generators
seeded from SHA-256(saved rank 0's torch state, ``r``).
"""

from __future__ import annotations

import platform
import socket
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from ..collectives import Group
from ..errors import ShardckptError
from ..format import jsoncodec
from .rng import RngState, get_rng_state, rng_state_for_rank, set_rng_state

__all__ = ["TrainState"]

_FORMAT = 1


def _check_json(value: Any, where: str) -> None:
    """Raise TypeError naming ``where`` unless JSON round-trips ``value`` exactly."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        return  # inf/nan are stored in the codec's JSON-safe form (best_val=inf is common)
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        if len(value) == 1 and jsoncodec.FLOAT_TAG in value:
            raise TypeError(f"{where} is a dict whose only key is {jsoncodec.FLOAT_TAG!r}, which JSON "
                            "stores as a non-finite float")
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has a non-string key {k!r}: JSON would turn it into a string")
            _check_json(v, f"{where}[{k!r}]")
        return
    hint = " (use a list)" if isinstance(value, tuple) else (
        "; convert it (e.g. float(x) / x.item())" if isinstance(value, torch.Tensor) else "")
    raise TypeError(
        f"{where} is a {type(value).__name__}, which is not JSON-serializable{hint}: "
        "TrainState extras and config hold int/float/str/bool/None and lists/dicts of them"
    )


def _dumps(value: Any) -> str:
    return jsoncodec.encode(value, canonical=False).decode()


def _loads(text: str) -> Any:
    return jsoncodec.decode(text, legacy_tokens=True)  # fields 0.1 wrote with NaN/Infinity tokens


def _json_dict(value: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"TrainState {name} must be a dict, got {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(k, str):
            raise TypeError(f"TrainState {name} key {k!r} is not a string")
        _check_json(v, f"{name}[{k!r}]")
    return value


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


class TrainState:
    """One object that saves and restores a training run, through the DCP
    ``Stateful`` protocol, so it goes straight into ``shardckpt.save`` / ``load``:

    >>> state = TrainState(model=model, optimizer=opt, scheduler=sched, scaler=scaler,
    ...                    sampler=sampler, extra={"best_val": None}, config=cfg, ema=ema)
    >>> state.step = 100
    >>> shardckpt.save({"train": state}, "ckpts/step_100")      # collective
    >>> shardckpt.load({"train": fresh_state}, "ckpts/step_100")  # restores everything

    Restored exactly: model and optimizer(s) (``get_state_dict`` / ``set_state_dict``:
    plain module, DDP or FSDP2, resharded to the current world size), scheduler,
    GradScaler (enabled or not: a mismatch between save and load warns and keeps
    the current scaler), sampler position, ``step`` and ``epoch``, ``extra``
    (merged into the current dict: keys absent from the checkpoint keep their
    value), ``config`` (replaced when the checkpoint has one; a warning lists the
    keys that differed) and any other ``Stateful`` passed as a keyword argument
    (kept in ``objects``). RNG: every rank's python,
    numpy, torch CPU and current-device CUDA state; same world size → each rank
    its own saved state; changed world size → ``RngReshardWarning`` and rank ``r``
    gets saved rank ``r``'s state if it existed, else a state seeded from
    SHA-256(saved rank 0's torch state, ``r``) (``shardckpt.state.rng``).
    Environment metadata (versions, world size, hostnames, time) is stored and,
    after a load, readable as ``saved_env``, never applied.

    ``state_dict()`` is collective under torch.distributed (it gathers RNG states
    over ``process_group``), as are ``save``/``load`` themselves: call them on
    every rank. ``extra`` and ``config`` must be the same on every rank (one copy
    is stored) and JSON-able; anything else raises ``TypeError`` naming the key.
    A fresh optimizer is fine to load into: ``get_state_dict`` initializes its
    state (with zero gradients, so parameters must not hold gradients yet).

    ``step`` and ``epoch`` are plain attributes for the training loop / manager to
    set before a save and read after a load; ``saved_world_size`` tells the world
    size the last loaded checkpoint was written at.
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        scheduler: Any = None,
        scaler: Any = None,
        sampler: Any = None,
        extra: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        step: int = 0,
        epoch: int = 0,
        state_dict_options: StateDictOptions | None = None,
        process_group: dist.ProcessGroup | None = None,
        **objects: Any,
    ) -> None:
        optimizers: tuple[torch.optim.Optimizer, ...] = (
            () if optimizer is None
            else (optimizer,) if isinstance(optimizer, torch.optim.Optimizer)
            else tuple(optimizer)
        )
        if optimizers and model is None:
            raise ValueError("TrainState: an optimizer needs its model (get_state_dict keys it by FQN)")
        for name, obj in [("scheduler", scheduler), ("scaler", scaler), ("sampler", sampler),
                          *objects.items()]:
            if obj is not None and not _is_stateful(obj):
                raise TypeError(f"TrainState {name}={type(obj).__name__} has no state_dict()/load_state_dict()")
        self.model = model
        self.optimizers = optimizers
        self.scheduler = scheduler
        self.scaler = scaler
        self.sampler = sampler
        _json_dict(extra, "extra")
        self.extra: dict[str, Any] = {} if extra is None else extra  # the caller's dict, not a copy
        self.config = _json_dict(config, "config")
        self.objects: dict[str, Any] = {k: v for k, v in objects.items() if v is not None}
        self.step = int(step)
        self.epoch = int(epoch)
        self.state_dict_options = state_dict_options
        self.process_group = process_group
        #: Environment metadata of the checkpoint last loaded (None before a load).
        self.saved_env: dict[str, Any] | None = None

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The (first) optimizer."""
        return self.optimizers[0] if self.optimizers else None

    # -- DCP Stateful ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The state to save (collective: gathers every rank's RNG state).

        A failure in the local parts (e.g. a non-JSON extra) on any rank is raised
        on every rank: the plain exception in one process, else a ``ShardckptError``
        naming the ranks (``rank_errors``), so no rank is left waiting in a collective.
        """
        local: dict[str, Any] = {}

        def mine() -> tuple[RngState, str, float]:
            local.update(self._local_state())
            return get_rng_state(), socket.gethostname(), time.time()

        out = Group(self.process_group).all_gather("TrainState.state_dict()", mine, ShardckptError)
        rng, hosts, now = tuple(o[0] for o in out), [o[1] for o in out], out[0][2]
        sd: dict[str, Any] = {"format": _FORMAT}
        if self.model is not None:  # may be collective itself (FSDP2), so after the gather
            if self.optimizers:
                sd["model"], sd["optimizer"] = get_state_dict(
                    self.model, self.optimizers, options=self.state_dict_options)
            else:
                sd["model"] = get_model_state_dict(self.model, options=self.state_dict_options)
        sd.update(local)
        sd["env"] = _dumps(self._env(len(rng), hosts, now))
        sd["rng"] = rng
        return sd

    def _local_state(self) -> dict[str, Any]:
        """Everything that needs no collective."""
        _json_dict(self.extra, "extra")  # again: the dict may have changed since __init__
        _json_dict(self.config, "config")
        sd: dict[str, Any] = {}
        if self.scheduler is not None:
            sd["scheduler"] = self.scheduler.state_dict()
        if self.scaler is not None:
            sd["scaler"] = _dumps({"enabled": self._scaler_enabled(), "state": self.scaler.state_dict()})
        if self.sampler is not None:
            sd["sampler"] = self.sampler.state_dict()
        if self.objects:
            sd["objects"] = {k: v.state_dict() for k, v in self.objects.items()}
        sd["progress"] = {"step": int(self.step), "epoch": int(self.epoch)}
        sd["extra"] = _dumps(self.extra)
        sd["config"] = _dumps(self.config)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Apply a loaded state (what ``shardckpt.load`` calls after filling it)."""
        sd = state_dict
        fmt = sd.get("format")
        if fmt != _FORMAT:
            raise ValueError(f"TrainState format {fmt!r} is not supported (expected {_FORMAT})")
        if self.model is not None:
            model_sd = self._take(sd, "model")
            if self.optimizers:
                set_state_dict(self.model, self.optimizers, model_state_dict=model_sd,
                               optim_state_dict=self._take(sd, "optimizer"),
                               options=self.state_dict_options)
            else:
                set_model_state_dict(self.model, model_sd, options=self.state_dict_options)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(self._take(sd, "scheduler"))
        if self.scaler is not None:
            self._load_scaler(_loads(self._take(sd, "scaler")))
        if self.sampler is not None:
            self.sampler.load_state_dict(self._take(sd, "sampler"))
        if self.objects:
            saved = self._take(sd, "objects")
            for name, obj in self.objects.items():
                if name not in saved:
                    raise ValueError(f"TrainState: the checkpoint holds no state for {name!r}")
                obj.load_state_dict(saved[name])
        progress = self._take(sd, "progress")
        self.step, self.epoch = int(progress["step"]), int(progress["epoch"])
        self.extra.update(_loads(self._take(sd, "extra")))
        self._load_config(_loads(self._take(sd, "config")))
        self.saved_env = _loads(self._take(sd, "env"))
        # Last, so nothing above can draw from the restored streams.
        rank, world_size = self._rank_world()
        set_rng_state(rng_state_for_rank(self._take(sd, "rng"), rank, world_size))

    # -- pieces ----------------------------------------------------------------------------

    @staticmethod
    def _take(sd: dict[str, Any], key: str) -> Any:
        if key not in sd:
            raise ValueError(f"TrainState: the loaded state has no {key!r} (saved without one?)")
        return sd[key]

    def _rank_world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)
        return 0, 1

    @staticmethod
    def _env(world_size: int, hosts: list[str], now: float) -> dict[str, Any]:
        from .. import __version__

        try:
            import numpy

            numpy_version: str | None = numpy.__version__
        except ImportError:  # pragma: no cover
            numpy_version = None
        return {
            "shardckpt": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "numpy": numpy_version,
            "cuda": torch.version.cuda,
            "world_size": world_size,
            "hostnames": hosts,
            "time": now,
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        }

    def _scaler_enabled(self) -> bool:
        is_enabled = getattr(self.scaler, "is_enabled", None)
        return bool(is_enabled()) if callable(is_enabled) else True

    def _load_scaler(self, saved: dict[str, Any]) -> None:
        enabled = self._scaler_enabled()
        if saved.get("enabled") and enabled:
            self.scaler.load_state_dict(saved["state"])
        elif bool(saved.get("enabled")) != enabled:
            # A disabled GradScaler has no state to give or take (e.g. CUDA's on a CPU host).
            warnings.warn(
                f"TrainState: GradScaler was {'enabled' if saved.get('enabled') else 'disabled'} "
                f"when saved and is {'enabled' if enabled else 'disabled'} now; keeping the current "
                "scaler's state",
                stacklevel=3,
            )

    def _load_config(self, saved: dict[str, Any] | None) -> None:
        if self.config is not None and saved is not None and self.config != saved:
            keys = sorted(k for k in set(self.config) | set(saved)
                          if self.config.get(k, _MISSING) != saved.get(k, _MISSING))
            warnings.warn(f"TrainState: config differs from the checkpoint's in {keys}; "
                          "restoring the checkpoint's", stacklevel=3)
        if saved is not None:  # a checkpoint saved without config leaves the current one
            self.config = saved

    @property
    def saved_world_size(self) -> int | None:
        """World size of the checkpoint last loaded (None before a load)."""
        return None if self.saved_env is None else int(self.saved_env["world_size"])


_MISSING = object()
