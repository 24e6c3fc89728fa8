"""The commit protocol of a checkpoint directory.

A directory holds ``data/`` (shard files, named by save id and rank) and, once
committed, ``manifest.json``. Without the manifest it is *incomplete*, whatever
else is there. Publication goes through ``Storage.write_atomic``: on a local
filesystem tmp + fsync + rename + directory fsync; on object stores a single PUT
issued only after every shard was checked to exist with its recorded size. Two
strategies because object stores have no rename and POSIX has no "PUT".

Overwriting is atomic too: new shards get a fresh save id, so the old manifest
and its shards stay intact until the new manifest replaces it; the superseded
shards are removed afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from ..errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    IncompleteCheckpointError,
)
from ..format.manifest import DATA_DIR, MANIFEST_NAME, Manifest, decode_manifest, encode_manifest
from .base import Storage

__all__ = ["prepare_target", "commit_manifest", "read_manifest", "remove_unreferenced", "size_mismatches"]

log = logging.getLogger(__name__)
_OURS = {MANIFEST_NAME, MANIFEST_NAME + ".tmp", DATA_DIR}


def prepare_target(storage: Storage, overwrite: bool) -> None:
    """Coordinator, before any rank writes: fail closed on a committed checkpoint
    (unless ``overwrite``) or on foreign files; clear an incomplete leftover."""
    if storage.exists() and not storage.isdir():
        raise CheckpointExistsError(f"{storage.url} exists and is not a directory", path=storage.url)
    names = set(storage.listdir())
    foreign = sorted(names - _OURS)
    if foreign:
        raise CheckpointExistsError(
            f"{storage.url} holds files that are not a shardckpt checkpoint's: {foreign[:5]}; "
            "refusing to write there",
            path=storage.url,
        )
    if MANIFEST_NAME in names:
        if not overwrite:
            raise CheckpointExistsError(
                f"a committed checkpoint already exists at {storage.url}; pass overwrite=True "
                "to replace it atomically, or choose another path",
                path=storage.url,
            )
    else:
        if names:
            log.warning("removing incomplete checkpoint leftovers at %s: %s", storage.url, sorted(names))
        storage.remove(MANIFEST_NAME + ".tmp")
        storage.remove_tree(DATA_DIR)
    storage.makedirs(DATA_DIR)


def size_mismatches(storage: Storage, files: Mapping[str, int]) -> dict[str, str]:
    """Shard files that are missing or not of their recorded size: path -> what is wrong."""
    wrong = {}
    for rel, expected in files.items():
        try:
            size: int | None = storage.size(rel)
        except FileNotFoundError:
            size = None
        if size != expected:
            wrong[rel] = f"{'missing' if size is None else f'{size} bytes'}, manifest records {expected}"
    return wrong


def commit_manifest(storage: Storage, manifest: Manifest) -> None:
    """Coordinator, after every rank reported success: check shard sizes, then publish."""
    wrong = size_mismatches(storage, manifest.files)
    if wrong:
        raise CheckpointWriteError(
            f"not committing {storage.url}: shard files do not match what ranks reported: "
            + "; ".join(f"{rel}: {why}" for rel, why in list(wrong.items())[:5]),
            path=storage.url,
        )
    storage.sync_dir(DATA_DIR)
    storage.write_atomic(MANIFEST_NAME, encode_manifest(manifest))


def read_manifest(storage: Storage) -> Manifest:
    """The committed manifest, validated; typed errors for missing, incomplete or damaged."""
    if not storage.exists():
        raise CheckpointNotFoundError(f"no checkpoint at {storage.url}", path=storage.url)
    if not storage.exists(MANIFEST_NAME):
        if storage.isdir() and ".metadata" in storage.listdir():
            hint = " (it looks like a torch.distributed.checkpoint directory, not a shardckpt one)"
        else:
            hint = " (a save never finished: no committed manifest)"
        raise IncompleteCheckpointError(f"{storage.url} is not a loadable checkpoint{hint}", path=storage.url)
    return decode_manifest(storage.read_bytes(MANIFEST_NAME), source=f"{storage.url}/{MANIFEST_NAME}")


def remove_unreferenced(storage: Storage, files: Mapping[str, int]) -> None:
    """After a commit: delete shard files no manifest refers to (an overwritten save's)."""
    for name in storage.listdir(DATA_DIR):
        rel = f"{DATA_DIR}/{name}"
        if rel not in files:
            try:
                storage.remove(rel)
            except OSError as e:  # the checkpoint is committed; leftovers are only untidy
                log.warning("could not remove superseded shard %s: %s", rel, e)
