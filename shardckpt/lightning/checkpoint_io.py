"""``ShardckptCheckpointIO``: Lightning's checkpoint plugin for single-device and
DDP strategies, and the calls around it (``latest``, ``load_checkpoint``,
``load_from_checkpoint``).

Every ``.ckpt`` path Lightning names becomes a shardckpt checkpoint directory
holding the whole dict Lightning builds (model, optimizers, loops, callbacks,
schedulers, hyper-parameters, ...), saved exactly (``integrations.tree``). Under
DDP, Lightning calls ``save_checkpoint`` on global rank 0 only, while the others
go on: the save runs over a gloo group of that rank alone, never a collective
the other ranks would have to join. Loading happens on every rank, each reading
the (replicated) checkpoint through its own group too.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..collectives import own_group
from ..engine.async_save import AsyncSaveHandle
from ..errors import CheckpointNotFoundError, CheckpointWriteError
from ..integrations import (
    by_commit_time,
    check_state_dict,
    children,
    load_tree,
    newest_valid,
    read_manifest,
    save_tree,
)
from ..store import UNUSABLE, CheckpointDir
from .pl import CHECKPOINT_IO_BASES, STRATEGY_BASES, CheckpointIO, LightningModule, load_state

__all__ = ["ShardckptCheckpointIO", "latest", "load_checkpoint", "load_from_checkpoint"]

StorageOptions = Mapping[str, Any] | None


def _calling_strategy() -> Any:
    """The Lightning strategy whose ``load_checkpoint`` called us, if any.

    Lightning gives a ``CheckpointIO`` no reference to the strategy or model; the
    model is needed to refuse another model's checkpoint with a typed error naming
    the key before any data is read (Lightning's own check comes later, untyped)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, STRATEGY_BASES):
                return owner
            frame = frame.f_back
    finally:
        del frame
    return None


def _place(tree: Any, map_location: Any) -> Any:
    """Tensors moved where ``map_location`` says (a device or its name); a callable
    or a dict (torch.load's storage remappers) leaves them on the CPU."""
    if not isinstance(map_location, (str, torch.device)):
        return tree
    device = torch.device(map_location)
    if device.type == "cpu":
        return tree

    def move(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, dict):
            return type(x)((k, move(v)) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return type(x)(move(v) for v in x)
        return x

    return move(tree)


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = None,
                    storage_options: StorageOptions = None) -> dict[str, Any]:
    """The dict Lightning saved at ``path`` (as ``torch.load`` of a native ``.ckpt``
    would give it), every chunk's CRC32C checked. Not collective."""
    tree = load_tree(path, process_group=own_group(), storage_options=storage_options)
    return _place(tree, map_location)


def load_from_checkpoint(cls: type[LightningModule], path: str | os.PathLike[str], map_location: Any = None,
                         strict: bool | None = None, storage_options: StorageOptions = None,
                         **kwargs: Any) -> LightningModule:
    """``cls.load_from_checkpoint(path)`` for a shardckpt checkpoint (Lightning's own
    reads single files only): the module built from the saved hyper-parameters
    (``kwargs`` override them) with the saved weights."""
    checkpoint = load_checkpoint(path, map_location, storage_options)
    return load_state(cls, checkpoint, strict=strict, **kwargs)  # type: ignore[return-value]


def latest(dirpath: str | os.PathLike[str], storage_options: StorageOptions = None) -> str | None:
    """The newest valid checkpoint under ``dirpath`` (a ``ModelCheckpoint`` directory),
    by commit time; incomplete and corrupt ones are skipped with a
    ``SkippedCheckpointWarning`` naming them. None when there is none:
    ``trainer.fit(model, ckpt_path=latest(dirpath))`` then starts afresh."""
    urls = by_commit_time(children(dirpath, storage_options), storage_options)
    return newest_valid(urls, storage_options)


class ShardckptCheckpointIO(CheckpointIO):
    """``Trainer(plugins=[ShardckptCheckpointIO()])``: Lightning's checkpoints as
    shardckpt checkpoints (manifest committed last, CRC32C on every chunk).

    ``storage_options``: for remote paths (s3://...), as in ``shardckpt.save``;
    ``compression``: as in ``shardckpt.save``; ``async_save``: a save returns once
    the state is staged and is written in the background; a failure there is
    raised by the next save, load or removal, or at the end of the run
    (Lightning's teardown waits for the last commit).
    """

    def __init__(self, storage_options: StorageOptions = None, compression: Any = "auto",
                 async_save: bool = False) -> None:
        super().__init__()
        self.storage_options = dict(storage_options) if storage_options is not None else None
        self.compression = compression
        self.async_save = async_save
        self._pending: AsyncSaveHandle | None = None

    def wait(self) -> None:
        """Wait for the save in flight (if any); raise its failure."""
        handle, self._pending = self._pending, None
        if handle is not None:
            handle.result()

    def _options(self, storage_options: Any) -> StorageOptions:
        return storage_options if storage_options is not None else self.storage_options

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.wait()  # one save in flight; an earlier background failure stops the run here
        # overwrite: Lightning re-saves last.ckpt; the swap is atomic, the previous
        # one stays loadable until the new one is committed
        meta = {"lightning": {k: checkpoint[k] for k in ("epoch", "global_step") if isinstance(checkpoint.get(k), int)}}
        self._pending = save_tree(checkpoint, os.fspath(path), process_group=own_group(),
                                  storage_options=self._options(storage_options), compression=self.compression,
                                  background=self.async_save, overwrite=True, metadata=meta)

    def load_checkpoint(self, path: Any, map_location: Callable[..., Any] | Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only: nothing here ever unpickles code, whatever the caller asks
        self.wait()
        path = os.fspath(path)
        manifest = read_manifest(path, self.storage_options)
        strategy = _calling_strategy()
        module = strategy.lightning_module if strategy is not None else None
        if module is not None:
            check_state_dict(manifest, path, ("state_dict",), module.state_dict(),
                             strict=getattr(module, "strict_loading", True))
        tree = load_tree(path, process_group=own_group(), storage_options=self.storage_options, manifest=manifest)
        return _place(tree, map_location)

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint at ``path``: un-commit first (manifest, then data).
        Refuses a directory that is not a shardckpt checkpoint (its files are not ours)."""
        self.wait()
        ckpt = CheckpointDir.at(os.fspath(path), self.storage_options)
        try:
            ckpt.read_manifest()
        except CheckpointNotFoundError as e:
            if not ckpt.storage.exists():
                return
            raise CheckpointWriteError(f"not removing {ckpt.url}: {e}", path=ckpt.url) from None
        except UNUSABLE:
            pass  # a torn or damaged checkpoint of ours: removed like a good one
        ckpt.delete()

    def teardown(self) -> None:
        self.wait()


# A plugin for either Lightning package's Trainer (they check isinstance against
# their own CheckpointIO ABC); it only needs the four methods above.
for _base in CHECKPOINT_IO_BASES[1:]:
    _base.register(ShardckptCheckpointIO)
