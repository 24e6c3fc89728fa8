"""The ``checkpoint-<step>`` directories of a Trainer's output directory: which
one to resume from (the newest that verifies) and which ones retention may delete.

Transformers' own rules pick "the highest step number" (``get_last_checkpoint``)
and delete with ``shutil.rmtree`` (``rotate_checkpoints``): a kill mid-save leaves
a torn newest directory that resume then picks, and a directory being written in
the background could be removed. Here resume skips torn and corrupt ones (with a
``SkippedCheckpointWarning`` naming each) and retention only ever deletes
committed shardckpt checkpoints, un-committing each before removing its data.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch.distributed as dist
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..integrations import children, is_checkpoint_dir, newest_valid, numbered
from ..store import CheckpointDir

__all__ = ["CHECKPOINT_PATTERN", "FORMAT", "checkpoints_newest_first", "latest", "is_native",
           "rotate"]

#: The directory names Trainer gives its checkpoints (its ``PREFIX_CHECKPOINT_DIR``).
CHECKPOINT_PATTERN = PREFIX_CHECKPOINT_DIR + r"-(\d+)"

#: Stored in every checkpoint's metadata: what wrote it, so a load can refuse others.
FORMAT = "shardckpt.transformers/1"

StorageOptions = Mapping[str, Any] | None


def checkpoints_newest_first(output_dir: str | os.PathLike[str], storage_options: StorageOptions = None) -> list[str]:
    """Every ``checkpoint-<step>`` entry under ``output_dir``, highest step first."""
    return numbered(children(output_dir, storage_options), CHECKPOINT_PATTERN)


def latest(
    output_dir: str | os.PathLike[str],
    storage_options: StorageOptions = None,
    process_group: dist.ProcessGroup | None = None,
) -> str | None:
    """The newest ``checkpoint-<step>`` under ``output_dir`` that is a complete
    shardckpt checkpoint whose every chunk verifies; None if there is none.

    Torn (a kill mid-save) and corrupt ones are skipped with a
    ``SkippedCheckpointWarning`` naming them; directories that are not shardckpt
    checkpoints at all (a native Trainer checkpoint, a user's folder) are passed over
    without one.
    Collective when torch.distributed is initialized (every rank gets the same answer).

    >>> trainer.train(resume_from_checkpoint=shardckpt.transformers.latest("out"))
    """
    found = [u for u in checkpoints_newest_first(output_dir, storage_options) if is_checkpoint_dir(u, storage_options)]
    return newest_valid(found, storage_options, process_group)


def is_native(url: str) -> bool:
    """Whether ``url`` is a checkpoint Transformers' own Trainer wrote (its
    ``trainer_state.json`` and no shardckpt manifest or data)."""
    if "://" in url and not url.startswith("file://"):
        return False  # the native Trainer only writes local directories
    local = url[len("file://"):] if url.startswith("file://") else url
    return (os.path.isfile(os.path.join(local, "trainer_state.json"))
            and not os.path.exists(os.path.join(local, "manifest.json"))
            and not os.path.exists(os.path.join(local, "data")))


def _committed(url: str, storage_options: StorageOptions) -> bool:
    try:
        return CheckpointDir.at(url, storage_options).is_committed()
    except OSError:
        return False


def rotate(
    output_dir: str | os.PathLike[str],
    save_total_limit: int | None,
    protected: Iterable[str | None],
    storage_options: StorageOptions = None,
) -> list[str]:
    """[coord] Delete the oldest committed shardckpt checkpoints so that at most
    ``save_total_limit`` remain, never the newest committed one nor any in
    ``protected`` (the best model's, one still being written). Torn directories
    and other files are left alone (a later save to the same step clears a torn
    one). Returns the URLs deleted."""
    if save_total_limit is None or save_total_limit <= 0:
        return []
    keep = {os.path.normpath(p) for p in protected if p}
    committed = [u for u in checkpoints_newest_first(output_dir, storage_options) if _committed(u, storage_options)]
    if committed:
        keep.add(os.path.normpath(committed[0]))  # the newest, for resuming
    excess = len(committed) - max(save_total_limit, len([u for u in committed if os.path.normpath(u) in keep]))
    deleted: list[str] = []
    for url in reversed(committed):  # oldest first
        if len(deleted) >= excess:
            break
        if os.path.normpath(url) in keep:
            continue
        CheckpointDir.at(url, storage_options).delete()
        deleted.append(url)
    return deleted
