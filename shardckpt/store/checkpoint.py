"""One checkpoint directory: its lifecycle over any byte backend.

A directory holds ``data/`` (shard files, named by save id and rank) and, once
committed, ``manifest.json``. Without the manifest it is *incomplete*, whatever
else is there: never loaded, reported as such, collected by the next save to
that path and by retention.

Call order of a save (``[coord]`` the coordinator, ``[all]`` every rank):

1. [coord] ``prepare(overwrite)``: fail closed on a committed checkpoint (unless
   ``overwrite``) or foreign files; clear an incomplete leftover, including
   unfinished uploads; then ``write_probe(token)``.
2. [all]   ``check_probe(token)``: the coordinator's probe is visible here, else
   the path is not on storage shared by all ranks (raised before any tensor
   byte is written).
3. [all]   write shard files under ``data/``.
4. [coord] ``commit(manifest)`` once every rank reported success: every shard's
   size confirmed, then the manifest published by the backend's strategy
   (``store.commit``); then ``remove_unreferenced`` drops what an overwrite
   superseded (and the probe).

Overwriting is atomic: new shards get a fresh save id, so the old manifest and
its shards stay intact until the new manifest replaces it.

``delete`` un-commits first (removes the manifest), then the data: a deletion
cut short leaves an incomplete directory, never a committed one with holes.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from ..backends import Storage, open_storage
from ..errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointWriteError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)
from ..format.manifest import DATA_DIR, MANIFEST_NAME, Manifest, decode_manifest, encode_manifest
from ..knobs import Knobs
from .commit import commit_strategy

__all__ = ["CheckpointDir", "PROBE_SUFFIX", "SHARED_STORAGE_HINT"]

log = logging.getLogger(__name__)
_OURS = {MANIFEST_NAME, MANIFEST_NAME + ".tmp", DATA_DIR}
PROBE_SUFFIX = ".probe"
#: The phrase every rank's error carries when ranks do not see the same files.
SHARED_STORAGE_HINT = "not on storage shared by all ranks"


class CheckpointDir:
    """A checkpoint directory at ``storage`` (or open one with ``CheckpointDir.at(url)``)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    @classmethod
    def at(cls, url: Any, storage_options: Mapping[str, Any] | None = None, knobs: Knobs | None = None,
           ) -> CheckpointDir:
        return cls(open_storage(url, storage_options, knobs=knobs))

    @property
    def url(self) -> str:
        return self.storage.url

    # -- saving

    def prepare(self, overwrite: bool) -> None:
        """[coord] Before any rank writes (step 1)."""
        s = self.storage
        if s.exists() and not s.isdir():
            raise CheckpointExistsError(f"{s.url} exists and is not a directory", path=s.url)
        names = set(s.listdir())
        foreign = sorted(names - _OURS)
        if foreign:
            raise CheckpointExistsError(
                f"{s.url} holds files that are not a shardckpt checkpoint's: {foreign[:5]}; "
                "refusing to write there", path=s.url)
        if MANIFEST_NAME in names:
            if not overwrite:
                raise CheckpointExistsError(
                    f"a committed checkpoint already exists at {s.url}; pass overwrite=True "
                    "to replace it atomically, or choose another path", path=s.url)
            s.abort_uploads(DATA_DIR)  # a killed overwrite's parts; committed shards stay
        else:
            if names:
                log.warning("removing incomplete checkpoint leftovers at %s: %s", s.url, sorted(names))
            s.remove(MANIFEST_NAME + ".tmp")
            s.remove_tree(DATA_DIR)
        commit_strategy(s).validate(s)
        s.makedirs(DATA_DIR)

    def probe_name(self, token: str) -> str:
        return f"{DATA_DIR}/{token}{PROBE_SUFFIX}"

    def write_probe(self, token: str) -> None:
        """[coord] A tiny file every rank must see before anything is written (step 1)."""
        self.storage.put(self.probe_name(token), token.encode())

    def check_probe(self, token: str, rank: int) -> None:
        """[all] Raise ``CheckpointWriteError`` if the coordinator's probe is not visible (step 2)."""
        rel = self.probe_name(token)
        try:
            seen = self.storage.read_bytes(rel)
        except FileNotFoundError:
            seen = None
        if seen != token.encode():
            raise CheckpointWriteError(
                f"{self.url} is {SHARED_STORAGE_HINT}: rank {rank} cannot see the file {rel} that the "
                "coordinator (rank 0) just wrote there (node-local disk or tmpfs at that path?). "
                "Save to a shared filesystem or an object store", path=self.url, rank=rank)

    def size_mismatches(self, files: Mapping[str, int]) -> dict[str, str]:
        """Shard files that are missing or not of their recorded size: path -> what is wrong."""
        wrong = {}
        for rel, expected in files.items():
            try:
                size: int | None = self.storage.size(rel)
            except (FileNotFoundError, NotADirectoryError):  # a path through a file is missing too
                size = None
            except OSError as e:  # not "missing": a read failure, raised as one
                raise CheckpointReadError(f"cannot stat {self.url}/{rel}: {type(e).__name__}: {e}",
                                          path=self.url, file=rel) from e
            if size != expected:
                wrong[rel] = f"{'missing' if size is None else f'{size} bytes'}, manifest records {expected}"
        return wrong

    def commit(self, manifest: Manifest) -> None:
        """[coord] After every rank reported success (step 4): check sizes, then publish."""
        wrong = self.size_mismatches(manifest.files)
        if wrong:
            raise CheckpointWriteError(
                f"not committing {self.url}: shard files do not match what ranks reported: "
                + "; ".join(f"{rel}: {why}" for rel, why in list(wrong.items())[:5])
                + (f" (if ranks run on several nodes, {self.url} may be {SHARED_STORAGE_HINT})"
                   if any("missing" in w for w in wrong.values()) else ""),
                path=self.url)
        self.storage.sync_dir(DATA_DIR)
        commit_strategy(self.storage).publish(self.storage, MANIFEST_NAME, encode_manifest(manifest))

    def remove_unreferenced(self, files: Mapping[str, int]) -> None:
        """[coord] After a commit: delete data no manifest refers to (superseded shards, probes).
        Never raises: the checkpoint is committed, a save reporting failure now would lie."""
        try:
            names = self.storage.listdir(DATA_DIR)
        except OSError as e:
            log.warning("could not list %s/%s to remove superseded shards: %s", self.url, DATA_DIR, e)
            return
        for name in names:
            rel = f"{DATA_DIR}/{name}"
            if rel not in files:
                try:
                    self.storage.remove(rel)
                except OSError as e:  # the checkpoint is committed; leftovers are only untidy
                    log.warning("could not remove superseded shard %s: %s", rel, e)

    def abandon(self, token: str) -> None:
        """[coord] After a save with this token failed on some rank (every rank is done
        with it): remove its probe and any file it left, and the directory if nothing
        else is in it. Best effort: the save's own error is what the caller raises, so
        failures here only warn; a committed manifest's files are never touched."""
        s = self.storage
        try:
            names = s.listdir(DATA_DIR)
            ours = [f"{DATA_DIR}/{n}" for n in names if n.startswith(token)]
            committed = self.is_committed()
            if committed:
                try:
                    referenced = set(self.read_manifest().files)
                except Exception:  # noqa: BLE001 - unreadable: touch nothing but the probe
                    referenced = set(ours)
                ours = [rel for rel in ours if rel not in referenced or rel == self.probe_name(token)]
            for rel in ours:
                s.remove(rel)
            if not committed and not s.listdir(DATA_DIR) and set(s.listdir()) <= {DATA_DIR}:
                s.remove_tree("")
        except Exception as e:  # noqa: BLE001 - runs while the save's own error propagates: never mask it
            log.warning("could not clean up after the failed save to %s: %s", self.url, e)

    # -- reading

    def is_committed(self) -> bool:
        return self.storage.exists(MANIFEST_NAME)

    def read_manifest(self, fresh: bool = False) -> Manifest:
        """The committed manifest, validated; typed errors for missing, incomplete or damaged
        (``CheckpointReadError`` when the storage fails to read it). ``fresh``: decode
        (and later read its indexes) anew, never from the recent-manifests cache (verify)."""
        s = self.storage
        try:
            data: bytes | None = s.read_bytes(MANIFEST_NAME)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            data = None
        except OSError as e:  # EIO, EACCES...: not "absent", and typed like every read failure
            raise CheckpointReadError(f"cannot read {s.url}/{MANIFEST_NAME}: {type(e).__name__}: {e}",
                                      path=s.url) from e
        if data is None:
            if not s.exists():
                raise CheckpointNotFoundError(f"no checkpoint at {s.url}", path=s.url)
            names = s.listdir()
            if ".metadata" in names:
                hint = " (it looks like a torch.distributed.checkpoint directory, not a shardckpt one)"
            elif names and DATA_DIR not in names:
                # none of shardckpt's own files (data/ holds a save's probe from its first
                # step on): not a save that never finished, and nothing to clean up
                shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
                raise CheckpointNotFoundError(f"{s.url} is not a shardckpt checkpoint (no {MANIFEST_NAME}, no "
                                              f"{DATA_DIR}/; it holds {shown})", path=s.url)
            else:
                hint = " (a save never finished: no committed manifest)"
            raise IncompleteCheckpointError(f"{s.url} is not a loadable checkpoint{hint}", path=s.url)
        return _decoded(s, data, fresh)

    def read_checked(self) -> Manifest:
        """The manifest, plus every shard file present with its recorded size (no data read)."""
        manifest = self.read_manifest()
        for rel, why in self.size_mismatches(manifest.files).items():
            raise CorruptCheckpointError(f"{self.url}/{rel}: {why}", file=rel)
        return manifest

    # -- deleting

    def delete(self) -> None:
        """Un-commit (remove the manifest, make that durable), then remove everything."""
        s = self.storage
        s.remove(MANIFEST_NAME)
        if s.isdir():
            s.sync_dir()
        s.remove_tree()


_recent: OrderedDict[tuple[str, bytes], Manifest] = OrderedDict()
_recent_lock = threading.Lock()


def _decoded(s: Storage, data: bytes, fresh: bool) -> Manifest:
    """``decode_manifest``, remembered for the last few manifests read: a restore lists a
    step and then loads it, and both read the same bytes. Keyed by the exact bytes,
    so an overwritten checkpoint (a new save id) is decoded afresh; its indexes are
    still checked against the CRC32C these bytes record when first read."""
    key = (s.url, data)
    with _recent_lock:
        hit = None if fresh else _recent.get(key)
        if hit is not None:
            _recent.move_to_end(key)
            if hit.source is not None:  # indexes not read yet are read through this storage
                hit.source.rebind(s.read_bytes)
            return hit
    m = decode_manifest(data, source=f"{s.url}/{MANIFEST_NAME}", read_index=s.read_bytes, url=s.url)
    if fresh:
        return m
    with _recent_lock:
        _recent[key] = m
        while len(_recent) > 4:
            _recent.popitem(last=False)
    return m
