"""Lightning's sharded strategies with shardckpt writing and reading their
distributed checkpoints.

``FSDPStrategy(state_dict_type="sharded")`` and ``ModelParallelStrategy`` (FSDP2 /
DTensor) call ``torch.distributed.checkpoint`` themselves and bypass the
``CheckpointIO``; these subclasses take over ``save_checkpoint`` /
``load_checkpoint``: one collective shardckpt save of the whole checkpoint (each
rank's shards of the model and optimizer states, written in parallel, the rest
of Lightning's dict from rank 0), and a load that reshards into the live model
at whatever number of processes it now runs on. Model and optimizer states go
through ``torch.distributed.checkpoint.state_dict`` (FQN-keyed, DTensor-valued)
both ways, so a checkpoint written by one of the two strategies loads in the other.
"""

from __future__ import annotations

import os
from typing import Any

from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..engine.async_save import AsyncSaveHandle
from ..integrations import check_state_dict, load_tree, read_manifest, save_tree
from .pl import FSDPStrategy, ModelParallelStrategy, TrainerFn

__all__ = ["ShardckptFSDPStrategy", "ShardckptModelParallelStrategy"]

#: What every rank saves: its shards. The rest of Lightning's dict comes from rank 0.
_SHARDED = ("state_dict", "optimizer_states")


class _ShardckptSharded:
    """The checkpoint methods both strategies share (a mixin ahead of Lightning's class)."""

    model: Any
    optimizers: list[Any]
    lightning_module: Any
    global_rank: int

    def _shardckpt_init(self, storage_options: Any, compression: Any, async_save: bool) -> None:
        self.shardckpt_storage_options = dict(storage_options) if storage_options is not None else None
        self.shardckpt_compression = compression
        self.shardckpt_async = async_save
        self._shardckpt_pending: AsyncSaveHandle | None = None

    def shardckpt_wait(self) -> None:
        """Wait for the save in flight (if any); raise its failure."""
        handle, self._shardckpt_pending = self._shardckpt_pending, None
        if handle is not None:
            handle.result()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model, options=StateDictOptions(cpu_offload=False))

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer
        return get_optimizer_state_dict(self.model, optimizer)

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        pass  # loaded in place by load_checkpoint (the model is set up first)

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        pass  # likewise

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        self.shardckpt_wait()
        path = self.broadcast(os.fspath(filepath))  # type: ignore[attr-defined]
        state = checkpoint if self.global_rank == 0 else {k: checkpoint[k] for k in _SHARDED if k in checkpoint}
        meta = {"lightning": {k: checkpoint[k] for k in ("epoch", "global_step") if isinstance(checkpoint.get(k), int)}}
        opts = storage_options if storage_options is not None else self.shardckpt_storage_options
        self._shardckpt_pending = save_tree(
            state, path, storage_options=opts, compression=self.shardckpt_compression,
            background=self.shardckpt_async, overwrite=True, metadata=meta)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        self.shardckpt_wait()
        path = self.broadcast(os.fspath(checkpoint_path))  # type: ignore[attr-defined]
        module = self.lightning_module
        strict = getattr(module, "strict_loading", True)
        manifest = read_manifest(path, self.shardckpt_storage_options)
        model_sd = self.lightning_module_state_dict()
        check_state_dict(manifest, path, ("state_dict",), model_sd, strict=strict)
        fitting = module.trainer.state.fn == TrainerFn.FITTING and bool(self.optimizers)
        live: dict[str, Any] = {"state_dict": model_sd}
        skip: tuple[str, ...] = ()
        if fitting:
            live["optimizer_states"] = [self.optimizer_state(o) for o in self.optimizers]
        else:
            skip = ("optimizer_states",)
        checkpoint = load_tree(path, storage_options=self.shardckpt_storage_options, live=live,
                               manifest=manifest, skip=skip)
        set_model_state_dict(self.model, checkpoint.pop("state_dict"), options=StateDictOptions(strict=strict))
        if fitting:
            saved = checkpoint.pop("optimizer_states", [])
            if len(saved) != len(self.optimizers):
                raise ValueError(f"{path} holds {len(saved)} optimizer state(s); the module configures "
                                 f"{len(self.optimizers)}")
            for optimizer, osd in zip(self.optimizers, saved):
                set_optimizer_state_dict(self.model, getattr(optimizer, "_optimizer", optimizer), osd)
        return checkpoint

    def teardown(self) -> None:
        self.shardckpt_wait()
        super().teardown()  # type: ignore[misc]


class ShardckptFSDPStrategy(_ShardckptSharded, FSDPStrategy):
    """``Trainer(strategy=ShardckptFSDPStrategy(...))``: Lightning's ``FSDPStrategy``
    (every constructor argument, ``state_dict_type="sharded"``) whose checkpoints
    are shardckpt checkpoints. Extra keywords: ``storage_options``,
    ``compression``, ``async_save`` (as ``ShardckptCheckpointIO``)."""

    def __init__(self, *args: Any, storage_options: Any = None, compression: Any = "auto",
                 async_save: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("state_dict_type", "sharded")
        if kwargs["state_dict_type"] != "sharded":
            raise ValueError("ShardckptFSDPStrategy saves sharded checkpoints (state_dict_type='sharded'); "
                             "for full single-file checkpoints use FSDPStrategy with ShardckptCheckpointIO")
        super().__init__(*args, **kwargs)
        self._shardckpt_init(storage_options, compression, async_save)


class ShardckptModelParallelStrategy(_ShardckptSharded, ModelParallelStrategy):
    """``Trainer(strategy=ShardckptModelParallelStrategy(...))``: Lightning's
    ``ModelParallelStrategy`` (FSDP2 / tensor parallel over DTensors, every
    constructor argument) whose checkpoints are shardckpt checkpoints. Extra
    keywords: ``storage_options``, ``compression``, ``async_save``."""

    def __init__(self, *args: Any, storage_options: Any = None, compression: Any = "auto",
                 async_save: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shardckpt_init(storage_options, compression, async_save)

