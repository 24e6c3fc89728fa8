"""Finding the checkpoint to resume from in a trainer's output directory: the
newest one that is complete and whose every chunk checks out, skipping (with a
``SkippedCheckpointWarning`` naming each) torn and corrupt ones. A trainer's
own "newest directory" rule would pick a checkpoint a kill left half-written.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch.distributed as dist

from ..backends import open_storage
from ..collectives import Group
from ..errors import CheckpointNotFoundError
from ..manager.loading import RootReads, control_group
from ..store import UNUSABLE, CheckpointDir

__all__ = ["SkippedCheckpointWarning", "children", "newest_valid", "numbered", "by_commit_time", "is_checkpoint_dir"]

StorageOptions = Mapping[str, Any] | None


class SkippedCheckpointWarning(UserWarning):
    """A checkpoint was passed over while looking for one to resume from (incomplete or corrupt)."""


def children(dirpath: str | os.PathLike[str], storage_options: StorageOptions = None) -> list[str]:
    """The URLs of the entries directly under ``dirpath`` (none if it does not exist)."""
    storage = open_storage(os.fspath(dirpath), storage_options)
    if not storage.exists():
        return []
    return [storage.child(name).url for name in sorted(storage.listdir())]


def is_checkpoint_dir(url: str, storage_options: StorageOptions = None) -> bool:
    """Whether ``url`` holds a shardckpt checkpoint, committed or torn (not some other file)."""
    try:
        CheckpointDir.at(url, storage_options).read_manifest()
    except CheckpointNotFoundError:
        return False
    except UNUSABLE:
        return True
    return True


def numbered(urls: Iterable[str], pattern: str) -> list[str]:
    """``urls`` whose last name matches ``pattern`` (one integer group), highest number first."""
    rx = re.compile(pattern)
    found = []
    for url in urls:
        m = rx.fullmatch(url.rstrip("/").rsplit("/", 1)[-1])
        if m:
            found.append((int(m.group(1)), url))
    return [url for _, url in sorted(found, reverse=True)]


def by_commit_time(urls: Iterable[str], storage_options: StorageOptions = None) -> list[str]:
    """Checkpoint ``urls`` newest commit first, after the ones without a readable
    manifest: a torn save is most likely the newest, and considering it first is
    what makes ``newest_valid`` warn that it was skipped."""
    keyed = []
    for url in urls:
        try:
            created = CheckpointDir.at(url, storage_options).read_manifest().created_unix
        except CheckpointNotFoundError:
            continue  # not a checkpoint at all: a file a user keeps beside them
        except UNUSABLE:
            created = float("inf")
        keyed.append((created, url))
    keyed.sort(key=lambda t: t[0], reverse=True)
    return [url for _, url in keyed]


def newest_valid(
    urls_newest_first: Iterable[str],
    storage_options: StorageOptions = None,
    process_group: dist.ProcessGroup | None = None,
    accept: Callable[[str], bool] | None = None,
) -> str | None:
    """The first of ``urls_newest_first`` that verifies (manifest, every file's size,
    every chunk's CRC32C), warning about each one skipped; None if none does.

    Collective when torch.distributed is initialized: each rank verifies 1/N of the
    chunks and every rank gets the same answer. ``accept``: a further test (the
    trainer's own files present), a failing one skipped with a warning too."""
    ctl = control_group(process_group) if dist.is_available() and dist.is_initialized() else Group(None)
    reads = RootReads(ctl, process_group, dict(storage_options) if storage_options else None)
    for url in urls_newest_first:
        ckpt = CheckpointDir.at(url, storage_options)
        problem = reads.verify(ckpt)
        if problem is None and accept is not None and not accept(url):
            problem = ("incomplete", "the trainer's files beside the checkpoint are missing")
        if problem is None:
            return url
        status, reason = problem
        if ctl.is_coordinator:
            warnings.warn(f"skipping {status} checkpoint {url}: {reason}", SkippedCheckpointWarning, stacklevel=2)
    return None
