"""``save_state`` / ``load_state``: one shardckpt checkpoint per ``accelerator.save_state()``.

Call order of ``save_state`` (every rank calls it, as ``accelerator.save_state``):

1. [all]   finish this accelerator's in-flight async save; its failure is raised here.
2. [all]   the target: ``output_dir``, or with ``automatic_checkpoint_naming``
           ``<project_dir>/checkpoints/checkpoint_<iteration>``; a committed one there
           stops the save before anything is deleted (unless ``overwrite``).
3. [coord] ``total_limit``: delete (un-commit first) the oldest checkpoints, torn ones
           before committed ones; the status is gathered, so every rank waits for it.
4. [all]   gather every rank's RNG and data position, save the tree (``save_tree``:
           manifest last, after every rank's shards are durable); async: return once staged.
5. [all]   ``project_configuration.iteration += 1`` as Accelerate does.

``load_state``: [all] the newest *valid* checkpoint (collective verification) when
no directory is given; the model-fit check from the manifest (before any data is
read); ``load_tree`` (every chunk's CRC32C checked); models, optimizers, the rest,
this rank's RNG last.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import weakref
from collections.abc import Mapping
from typing import Any

from ..collectives import Group
from ..engine import async_save as async_engine
from ..engine.async_save import AsyncSaveHandle
from ..errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    UnsupportedFormatError,
)
from ..integrations import (
    check_state_dict,
    children,
    is_checkpoint_dir,
    load_tree,
    newest_valid,
    numbered,
    read_manifest,
    save_tree,
)
from ..store import CheckpointDir
from . import contents

__all__ = ["save_state", "load_state", "latest", "wait", "META_KEY"]

#: The manifest metadata key under which a checkpoint records it is Accelerate's.
META_KEY = "shardckpt.accelerate"
CHECKPOINT_PATTERN = r"checkpoint_(\d+)"

StorageOptions = Mapping[str, Any] | None

_pending: weakref.WeakKeyDictionary[Any, AsyncSaveHandle] = weakref.WeakKeyDictionary()
_pending_lock = threading.Lock()


def _checkpoints_root(accelerator: Any) -> str:
    return os.path.join(accelerator.project_dir, "checkpoints")


def _automatic(accelerator: Any) -> bool:
    return bool(accelerator.project_configuration.automatic_checkpoint_naming)


def _mine(urls: list[str], storage_options: StorageOptions) -> list[str]:
    """Checkpoint directories (committed or torn), highest number first; anything else is left alone."""
    return [u for u in numbered(urls, CHECKPOINT_PATTERN) if is_checkpoint_dir(u, storage_options)]


def _prune(root: str, keep: int, storage_options: StorageOptions) -> None:
    """Leave at most ``keep - 1`` checkpoints under ``root`` (room for the one being saved)."""
    found = _mine(children(root, storage_options), storage_options)
    excess = len(found) + 1 - keep
    if excess <= 0:
        return
    dirs = [CheckpointDir.at(u, storage_options) for u in found]
    # Torn ones go first, then the oldest committed: never a newer committed one before a torn one.
    order = [d for d in reversed(dirs) if not d.is_committed()] + [d for d in reversed(dirs) if d.is_committed()]
    for d in order[:excess]:
        d.delete()


def save_state(
    accelerator: Any,
    output_dir: str | os.PathLike[str] | None = None,
    *,
    async_save: bool = False,
    overwrite: bool = False,
    storage_options: StorageOptions = None,
    compression: Any = "auto",
    safe_serialization: bool = True,
) -> str:
    """Drop-in for ``accelerator.save_state(output_dir)``: one shardckpt checkpoint (prepared
    models and optimizers, schedulers, scaler, every process's RNG, registered objects,
    dataloader positions, ``accelerator.step``) at ``output_dir`` or, with
    ``ProjectConfiguration(automatic_checkpoint_naming=True)``, at
    ``<project_dir>/checkpoints/checkpoint_<iteration>`` keeping ``total_limit``.

    ``async_save``: return once the state is staged; the next ``save_state`` /
    ``load_state`` / ``wait`` / ``accelerator.end_training()`` waits for the commit and
    raises a background failure. ``safe_serialization`` is accepted and ignored (no pickle
    is ever loaded unrestricted here). Returns the checkpoint's path or URL.

    >>> shardckpt.accelerate.save_state(accelerator, "ckpts/step_100")
    """
    del safe_serialization
    wait(accelerator)
    prep = contents.Prepared.of(accelerator)
    config = accelerator.project_configuration
    if _automatic(accelerator):
        root = _checkpoints_root(accelerator)
        path = f"{root.rstrip('/')}/checkpoint_{config.iteration}"
    elif output_dir is None:
        raise ValueError("save_state needs output_dir unless ProjectConfiguration(automatic_checkpoint_naming=True)")
    else:
        root, path = "", os.fspath(output_dir)
    if not overwrite and CheckpointDir.at(path, storage_options).is_committed():
        raise CheckpointExistsError(f"{path} already holds a committed checkpoint (iteration {config.iteration}); "
                                    "pass overwrite=True or set project_configuration.iteration", path=path)
    group = Group(None)
    if root and config.total_limit is not None:
        group.run(f"deleting old checkpoints under {root} (total_limit={config.total_limit})",
                  lambda: _prune(root, config.total_limit, storage_options) if group.is_coordinator else None,
                  CheckpointWriteError)
    meta = {META_KEY: {"iteration": int(config.iteration), "world_size": group.world_size, "fsdp2": prep.fsdp2}}
    handle = save_tree(contents.collect(accelerator, prep), path, storage_options=storage_options,
                       compression=compression, background=async_save, overwrite=overwrite, metadata=meta)
    if handle is not None:
        with _pending_lock:
            _pending[accelerator] = handle
        _wait_at_end_of_training(accelerator)
    config.iteration += 1
    return path


def wait(accelerator: Any) -> None:
    """Wait until this accelerator's in-flight async save is committed; raise its failure
    (a ``CheckpointWriteError`` naming the failing ranks), so none is silently lost."""
    with _pending_lock:
        handle = _pending.pop(accelerator, None)
    if handle is not None:
        handle.result()
    async_engine.wait_all()  # and any failure of a save whose handle was dropped


def _wait_at_end_of_training(accelerator: Any) -> None:
    """Make ``accelerator.end_training()`` wait for the last commit before it destroys the
    process group the background commit runs over (Accelerate has no end-of-run hook)."""
    if getattr(accelerator, "_shardckpt_waits_at_end", False):
        return
    original = accelerator.end_training

    def end_training() -> None:
        try:
            wait(accelerator)
        finally:
            original()

    accelerator.end_training = end_training
    accelerator._shardckpt_waits_at_end = True


@atexit.register
def _wait_at_exit() -> None:
    """A script that never calls ``end_training``: the last async save still commits, and a
    failure makes the process exit non-zero instead of vanishing with the thread."""
    with _pending_lock:
        accelerators = list(_pending.keys())
    for acc in accelerators:
        try:
            wait(acc)
        except Exception as e:  # noqa: BLE001 - reported and turned into the exit status
            sys.stderr.write(f"shardckpt.accelerate: the last async save failed: {type(e).__name__}: {e}\n")
            sys.stderr.flush()
            os._exit(1)


def latest(accelerator_or_dir: Any, storage_options: StorageOptions = None) -> str | None:
    """The newest checkpoint under ``<project_dir>/checkpoints`` (or a directory given) that
    verifies, skipping torn and corrupt ones with a ``SkippedCheckpointWarning``; None if none.
    Collective when torch.distributed is initialized."""
    root = accelerator_or_dir if isinstance(accelerator_or_dir, (str, os.PathLike)) else \
        _checkpoints_root(accelerator_or_dir)
    return newest_valid(numbered(children(os.fspath(root), storage_options), CHECKPOINT_PATTERN), storage_options)


def load_state(
    accelerator: Any,
    input_dir: str | os.PathLike[str] | None = None,
    *,
    storage_options: StorageOptions = None,
) -> str:
    """Drop-in for ``accelerator.load_state(input_dir)``: restore everything ``save_state``
    stored, at this run's number of processes. With no ``input_dir`` and automatic naming,
    the newest *valid* checkpoint (``latest``). Raises shardckpt's typed errors naming the
    path (and key): not a checkpoint, a corrupt chunk, another model's checkpoint. Returns
    the path loaded.

    >>> shardckpt.accelerate.load_state(accelerator)  # resume from the newest valid one
    """
    wait(accelerator)
    prep = contents.Prepared.of(accelerator)
    if input_dir is None:
        if not _automatic(accelerator):
            raise ValueError("No input_dir provided and automatic checkpoint naming is disabled.")
        found = latest(accelerator, storage_options)
        if found is None:
            root = _checkpoints_root(accelerator)
            raise CheckpointNotFoundError(f"no valid checkpoint under {root}", path=root)
        input_dir = found
    path = os.fspath(input_dir)
    manifest = read_manifest(path, storage_options)
    info = manifest.metadata.get(META_KEY)
    if not isinstance(info, dict):
        raise UnsupportedFormatError(f"{path} is a shardckpt checkpoint but not one shardckpt.accelerate wrote "
                                     f"(no {META_KEY!r} in its metadata)", path=path)
    for i, live in enumerate(contents.model_states(accelerator, prep)):
        check_state_dict(manifest, path, ("models", i), live)
    tree = load_tree(path, storage_options=storage_options, live=contents.live_tree(accelerator, prep),
                     manifest=manifest)
    contents.restore_models(prep, tree["models"], path)
    contents.restore_optimizers(prep, tree["optimizers"], path)
    contents.restore_extras(accelerator, prep, tree, path)
    if _automatic(accelerator):
        _continue_numbering(accelerator, int(info.get("iteration", -1)), storage_options)
    return path


def _continue_numbering(accelerator: Any, loaded: int, storage_options: StorageOptions) -> None:
    """Number the next save past the loaded one and past every directory already there
    (a torn or corrupt newer one is never reused or overwritten; total_limit prunes it)."""
    names = numbered(children(_checkpoints_root(accelerator), storage_options), CHECKPOINT_PATTERN)
    highest = int(names[0].rstrip("/").rsplit("_", 1)[-1]) if names else -1
    accelerator.project_configuration.iteration = max(loaded, highest) + 1
