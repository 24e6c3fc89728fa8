"""One shardckpt checkpoint per MMEngine checkpoint, and finding the one to resume from.

``save`` [all ranks, collective]: the checkpoint dict ``Runner.save_checkpoint`` builds
(hooks' ``before_save_checkpoint`` included), saved by ``save_tree`` (every rank writes
its part, manifest committed last). MMEngine saves on rank 0 only; shardckpt's save is
collective, so every rank calls it.

``read`` [all ranks]: a shardckpt checkpoint directory (every chunk's CRC32C checked,
the model-fit check from the manifest before any data is read) or an MMEngine ``.pth``
(weights-only loading), as the dict MMEngine's loaders expect.

``latest`` [all ranks, collective when distributed]: the newest checkpoint under a
work dir that verifies, skipping torn and corrupt ones with a warning naming them;
``last_checkpoint`` is not trusted (it may name a torn save).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import CheckpointExistsError, UnsupportedFormatError
from ..integrations import (
    by_commit_time,
    children,
    is_checkpoint_dir,
    load_tree,
    newest_valid,
    numbered,
    read_manifest,
    save_tree,
    skeleton_of,
    stored_shapes,
    subtree,
)
from ..store import CheckpointDir
from . import contents

__all__ = ["META_KEY", "CHECKPOINT_PATTERN", "save", "read", "latest", "is_ours", "join", "committed_elsewhere"]

#: The manifest metadata key under which a checkpoint records it is MMEngine's.
META_KEY = "shardckpt.mmengine"
#: ``epoch_N`` / ``iter_N`` (``.pth`` too: MMEngine's own hook with ``ShardckptRunner``).
CHECKPOINT_PATTERN = r"(?:epoch|iter)_(\d+)(?:\.pth)?"

StorageOptions = Mapping[str, Any] | None


def join(out_dir: str, filename: str) -> str:
    """``out_dir/filename`` for local paths and URLs alike."""
    return os.path.join(out_dir, filename) if "://" not in out_dir else f"{out_dir.rstrip('/')}/{filename}"


def save(runner: Any, out_dir: str, filename: str, *, save_optimizer: bool = True,
         save_param_scheduler: bool = True, meta: dict[str, Any] | None = None, by_epoch: bool = True,
         storage_options: StorageOptions = None, compression: Any = "auto") -> str:
    """What ``Runner.save_checkpoint(out_dir, filename, ...)`` saves, as a shardckpt
    checkpoint directory at ``out_dir/filename``. Every rank calls it. Returns the path."""
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict):
        raise TypeError(f"meta should be a dict or None, but got {type(meta)}")
    meta = dict(meta)
    # the hook calls this after the epoch / iteration finished and before the counter moves
    meta.setdefault("epoch", runner.epoch + 1 if by_epoch else runner.epoch)
    meta.setdefault("iter", runner.iter if by_epoch else runner.iter + 1)
    path = join(os.fspath(out_dir), filename)
    # MMEngine overwrites a file of the same name (a best_* re-saved, a step saved again
    # after a resume, a torn save's leftovers): so do we, unless another program's is there
    committed_elsewhere(path, storage_options)
    checkpoint = contents.collect(runner, meta, save_optimizer, save_param_scheduler)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    info = {"epoch": int(meta["epoch"]), "iter": int(meta["iter"]), "world_size": world}
    save_tree(checkpoint, path, storage_options=storage_options, compression=compression, overwrite=True,
              metadata={META_KEY: info})
    return path


def is_ours(path: str, storage_options: StorageOptions = None) -> bool:
    """Whether ``path`` is a shardckpt checkpoint directory (committed or torn), not a file."""
    if "://" not in path and os.path.isfile(path):
        return False
    return is_checkpoint_dir(path, storage_options)


def _check_ours(manifest: Any, path: str) -> None:
    if not isinstance(manifest.metadata.get(META_KEY), dict):
        raise UnsupportedFormatError(f"{path} is a shardckpt checkpoint but not one shardckpt.mmengine wrote "
                                     f"(no {META_KEY!r} in its metadata)", path=path, key=META_KEY)


def read(path: str | os.PathLike[str], model: torch.nn.Module | None = None, *, strict: bool = False,
         revise_keys: list[tuple[str, str]] | None = None, storage_options: StorageOptions = None,
         with_optimizer: bool = True) -> dict[str, Any]:
    """The MMEngine checkpoint dict at ``path`` (ours, or an MMEngine ``.pth``), tensors on
    the CPU. With ``model``: raise ``CheckpointMismatchError`` (path and key) where the
    stored weights do not fit it (any shape; with ``strict`` any key on one side only),
    for our checkpoints before any data is read. ``with_optimizer=False``: the
    optimizer state is not read (``load_from``: weights only)."""
    where = os.fspath(path)
    keys = revise_keys if revise_keys is not None else [(r"^module\.", "")]
    if "://" not in where and os.path.isfile(where):  # an MMEngine .pth (a directory is ours)
        checkpoint = contents.load_pth(where)
        if model is not None:
            shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None
                      for k, v in checkpoint["state_dict"].items()}
            contents.check_fit(where, shapes, model, keys, strict)
        return checkpoint
    manifest = read_manifest(where, storage_options)
    _check_ours(manifest, where)
    if model is not None:
        node = subtree(skeleton_of(manifest, where), "state_dict")
        contents.check_fit(where, stored_shapes(manifest, node), model, keys, strict)
    skip = () if with_optimizer else ("optimizer",)
    tree = load_tree(where, storage_options=storage_options, manifest=manifest, skip=skip)
    return contents.from_storable(tree)


def latest(work_dir: str | os.PathLike[str], storage_options: StorageOptions = None) -> str | None:
    """The newest ``epoch_N`` / ``iter_N`` checkpoint under ``work_dir`` that verifies
    (``best_*`` ones hold no optimizer state and are never resumed from); torn and
    corrupt ones are skipped with a ``SkippedCheckpointWarning``. None if none."""
    root = os.fspath(work_dir)
    candidates = [u for u in numbered(children(root, storage_options), CHECKPOINT_PATTERN)
                  if is_ours(u, storage_options)]
    # epoch_ and iter_ numbers do not compare: commit time orders them (torn ones first)
    return newest_valid(by_commit_time(candidates, storage_options), storage_options)


def committed_elsewhere(path: str, storage_options: StorageOptions = None) -> None:
    """Refuse to save over a committed checkpoint that is not MMEngine's (a user's other run)."""
    ckpt = CheckpointDir.at(path, storage_options)
    if ckpt.is_committed() and not isinstance(ckpt.read_manifest().metadata.get(META_KEY), dict):
        raise CheckpointExistsError(f"{path} holds a shardckpt checkpoint another program wrote", path=path)
