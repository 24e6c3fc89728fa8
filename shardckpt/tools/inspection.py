"""The Python API behind ``python -m shardckpt``: list, inspect, verify, diff and
garbage-collect checkpoints on any backend the library reads.

Every function returns plain JSON-able data (dicts, lists, strings, numbers), and
that data is exactly what the command prints with ``--json``: a script gets the
same answer from Python and from the shell. Checkpoint problems raise
``ShardckptError`` subclasses (exit code 1 on the command line);
``verify_checkpoints`` reports them per path instead, because "which of these
are damaged" is its answer.

Reading takes no lock and writes nothing: ``list_checkpoints``, ``inspect``,
``verify_checkpoints`` and ``diff`` are safe while a job saves under the same
root (a save in flight has no manifest yet and lists as ``incomplete``).

``gc`` deletes, so it behaves like a manager's retention (one process, in order):

1. read the root's owner marker; a live owner means a ``CheckpointManager`` is
   running there: refuse (``CheckpointExistsError`` naming its host and pid),
   unless ``force``;
2. unless ``dry_run``: take the marker for the duration (a manager starting
   meanwhile is refused), except with ``force`` over a live owner, whose marker
   is left alone (taking it would make that manager stop saving);
3. list the step checkpoints (manifest and shard sizes, no data read) and ask
   ``retention.steps_to_delete`` with the manager's own policies; the newest
   valid checkpoint is never among them;
4. delete each, oldest first, with ``CheckpointRoot.delete`` (un-commit first);
5. release the marker.
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..backends import Storage, open_storage
from ..errors import CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError
from ..format import jsoncodec
from ..format.manifest import MANIFEST_NAME, Entry, Manifest, TensorEntry, header_fields
from ..store import (
    OWNER_MARKER,
    UNUSABLE,
    CheckpointDir,
    CheckpointRoot,
    OwnerMarker,
    parse_step,
    status_of,
    verify_dir,
)
from ..store.retention import (
    CheckpointInfo,
    CheckpointStatus,
    KeepBest,
    KeepEvery,
    KeepLast,
    RetentionPolicy,
    build_policies,
    newest_valid,
    steps_to_delete,
)
from .compare import DIFF_READ_BUDGET, ProgressCallback, diff
from .compare import tick as _tick

__all__ = [
    "ProgressCallback",
    "ListedCheckpoint",
    "list_checkpoints",
    "inspect",
    "verify_checkpoints",
    "diff",
    "gc",
    "read_owner",
    "describe_owner",
    "describe_error",
    "DIFF_READ_BUDGET",
]

PathLike = str | os.PathLike[str]
StorageOptions = Mapping[str, Any] | None



def _existing(url: PathLike, storage_options: StorageOptions) -> Storage:
    storage = open_storage(url, storage_options)
    if not storage.exists():
        raise CheckpointNotFoundError(f"no such directory: {storage.url}", path=storage.url)
    return storage


# ------------------------------------------------------------------------ listing


@dataclass(frozen=True)
class ListedCheckpoint:
    """One checkpoint directory found by ``list_checkpoints``: ``CheckpointInfo``'s
    fields, plus its directory ``name`` (``""`` when the listed path is itself a
    checkpoint) and ``world_size``. ``step`` comes from a ``step_N`` name, else from
    the manifest's ``step`` metadata, else None."""

    name: str
    path: str
    step: int | None
    status: CheckpointStatus
    size_bytes: int | None = None
    created_unix: float | None = None
    world_size: int | None = None
    metrics: Mapping[str, float | None] = field(default_factory=dict)
    reason: str | None = None

    @property
    def valid(self) -> bool:
        return self.status == "valid"

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        out = asdict(self)
        out["metrics"] = dict(self.metrics)
        now = time.time() if now is None else now
        out["age_seconds"] = None if self.created_unix is None else round(now - self.created_unix, 3)
        return out


def _examine(ckpt: CheckpointDir, deep: bool) -> tuple[CheckpointStatus, Manifest | None, str | None] | None:
    """Status of one directory (as ``CheckpointRoot.list`` judges it); None if it vanished."""
    try:
        manifest = verify_dir(ckpt).manifest if deep else ckpt.read_checked()
    except CheckpointNotFoundError:
        return None
    except UNUSABLE as e:
        return status_of(e), None, str(e)  # type: ignore[return-value]
    return "valid", manifest, None


def _checkpoint_dirs(storage: Storage) -> list[tuple[str, int | None]]:
    """``(name, step from the name)``: step directories (any status) by step, then other
    subdirectories holding a manifest by name; just ``("", None)`` if the path is one."""
    names = storage.listdir()
    if MANIFEST_NAME in names:
        return [("", None)]
    steps = sorted((s, n) for n in names if (s := parse_step(n)) is not None)
    others = sorted(n for n in names if parse_step(n) is None and storage.exists(f"{n}/{MANIFEST_NAME}"))
    return [(n, s) for s, n in steps] + [(n, None) for n in others]


def list_checkpoints(
    root: PathLike,
    *,
    verify: bool = False,
    storage_options: StorageOptions = None,
    progress: ProgressCallback | None = None,
) -> list[ListedCheckpoint]:
    """Checkpoints under ``root``: its ``step_N`` directories (whatever their status)
    and any other subdirectory holding a ``manifest.json``; or ``root`` itself if it
    is a checkpoint. ``verify`` checks every chunk (else manifest and shard sizes).

    Takes no lock and writes nothing. A directory without a manifest that is not
    named ``step_N`` is not listed (nothing tells it apart from any other directory).

    >>> [(c.step, c.status) for c in list_checkpoints("ckpts/run1")]
    [(100, 'valid'), (200, 'incomplete')]
    """
    storage = _existing(root, storage_options)
    targets = _checkpoint_dirs(storage)
    out = []
    for i, (name, step) in enumerate(targets):
        ckpt = CheckpointDir(storage.child(name) if name else storage)
        _tick(progress, name or ckpt.url, i, len(targets))
        found = _examine(ckpt, verify)
        if found is None:
            continue
        status, manifest, reason = found
        if manifest is None:
            out.append(ListedCheckpoint(name, ckpt.url, step, status, reason=reason))
            continue
        meta_step, metrics = manifest.metadata.get("step"), manifest.metadata.get("metrics")
        if step is None and isinstance(meta_step, int) and not isinstance(meta_step, bool):
            step = meta_step
        out.append(ListedCheckpoint(
            name, ckpt.url, step, status, size_bytes=manifest.total_bytes, created_unix=manifest.created_unix,
            world_size=manifest.world_size, metrics=dict(metrics) if isinstance(metrics, dict) else {},
        ))
    _tick(progress, "", len(targets), len(targets))
    return out


# ------------------------------------------------------------------------ inspect


def _entry_info(e: Entry) -> dict[str, Any]:
    if isinstance(e, TensorEntry):
        chunks = [c for s in e.shards for c in s.blob.chunks]
        info = {
            "kind": "tensor", "dtype": e.dtype, "shape": list(e.shape),
            "raw_bytes": sum(c.raw_len for c in chunks), "stored_bytes": sum(c.stored_len for c in chunks),
            "codecs": sorted({c.codec for c in chunks}), "shards": len(e.shards), "chunks": len(chunks),
        }
        if e.layout is not None:  # version 2: the grid and writers, as stored
            info["layout"] = e.layout.to_json()
        return info
    if e.blob is None:
        n = len(jsoncodec.encode(e.value, canonical=False))
        return {"kind": "object", "encoding": e.encoding, "raw_bytes": n, "stored_bytes": n,
                "codecs": ["inline"], "shards": 0, "chunks": 0, "value": e.value}
    return {"kind": "object", "encoding": e.encoding, "raw_bytes": e.blob.raw_len,
            "stored_bytes": e.blob.stored_len, "codecs": sorted({c.codec for c in e.blob.chunks}),
            "shards": 1, "chunks": len(e.blob.chunks)}


def inspect(path: PathLike, *, keys: Sequence[str] | None = None, storage_options: StorageOptions = None) -> dict[str, Any]:
    """What the manifest of the checkpoint at ``path`` says, without reading data.

    ``keys``: shell-style patterns on the dotted key names (``"model.*"``; ``*``
    also crosses dots); only matching keys are listed (``totals`` stay the whole
    checkpoint's). Inline JSON values are included as ``value``.
    """
    ckpt = CheckpointDir.at(path, storage_options)
    m = ckpt.read_manifest()
    infos = {k: _entry_info(e) for k, e in sorted(m.entries.items())}
    shown = {k: v for k, v in infos.items() if not keys or any(fnmatch.fnmatchcase(k, p) for p in keys)}
    return {
        "path": ckpt.url,
        "format_version": m.version,
        **header_fields(m),
        "files": dict(m.files),
        "indexes": {str(r): rel for r, (rel, _) in sorted(m.indexes.items())},
        "totals": {
            "keys": len(infos),
            "tensors": sum(v["kind"] == "tensor" for v in infos.values()),
            "objects": sum(v["kind"] == "object" for v in infos.values()),
            "raw_bytes": sum(v["raw_bytes"] for v in infos.values()),
            "stored_bytes": sum(v["stored_bytes"] for v in infos.values()),
            "files": len(m.files),
            "file_bytes": m.total_bytes,
        },
        "patterns": list(keys or []),
        "keys": shown,
    }


# ------------------------------------------------------------------------- verify


def describe_error(e: BaseException) -> dict[str, Any]:
    """A damaged place (or any error) as JSON: ``file``, ``key``, ``chunk`` (None when unknown), ``message``."""
    return {"file": getattr(e, "file", None), "key": getattr(e, "key", None),
            "chunk": getattr(e, "chunk", None), "message": str(e)}


def verify_checkpoints(
    paths: Iterable[PathLike], *, storage_options: StorageOptions = None, progress: ProgressCallback | None = None,
) -> list[dict[str, Any]]:
    """Verify each checkpoint (every chunk's CRC32C and decoding, as ``shardckpt.verify``)
    and report on each instead of stopping at the first problem: ``status`` is
    ``valid``, ``corrupt`` (``damaged`` names file, key and chunk of every damaged
    place), ``incomplete`` or ``not_found``."""
    names = [os.fspath(p) for p in paths]
    out = []
    for i, path in enumerate(names):
        _tick(progress, path, i, len(names))
        rec: dict[str, Any] = {"path": path}
        try:
            r = verify_dir(CheckpointDir.at(path, storage_options))
        except CheckpointNotFoundError as e:
            rec.update(status="not_found", message=str(e), damaged=[])
        except UNUSABLE as e:
            places = getattr(e, "damaged", None) or ([e] if isinstance(e, CorruptCheckpointError) else [])
            rec.update(status=status_of(e), message=str(e), damaged=[describe_error(d) for d in places])
        else:
            rec.update(status="valid", files=r.files, chunks=r.chunks, bytes_checked=r.bytes_checked,
                       seconds=round(r.seconds, 4), crc_implementation=r.crc_implementation, damaged=[])
        out.append(rec)
    _tick(progress, "", len(names), len(names))
    return out


# --------------------------------------------------------------------------- diff


def _owner_of(storage: Storage) -> dict[str, Any] | None:
    try:
        raw = storage.read_bytes(OWNER_MARKER)
    except FileNotFoundError:
        return None
    try:
        current = jsoncodec.decode(raw)
    except ValueError as e:
        current = {"unreadable": str(e)}
    if not isinstance(current, dict):
        current = {"unreadable": "not a JSON object"}
    # The manager's own liveness rules (pid on this host, torchrun restarts); an
    # unreadable marker counts as live: fail closed.
    stale = OwnerMarker(storage).stale_reason(current)
    return {"hostname": current.get("hostname"), "pid": current.get("pid"),
            "created_unix": current.get("created_unix"), "run_id": current.get("run_id"),
            "unreadable": current.get("unreadable"), "live": stale is None, "stale_reason": stale}


def read_owner(root: PathLike, *, storage_options: StorageOptions = None) -> dict[str, Any] | None:
    """The owner marker of ``root`` (host, pid, since, ``live`` by the manager's rules), or None."""
    return _owner_of(open_storage(root, storage_options))


def describe_owner(owner: Mapping[str, Any]) -> str:
    if owner.get("unreadable"):
        return f"unreadable owner marker: {owner['unreadable']}"
    when = owner.get("created_unix")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(when, (int, float)) else "?"
    return f"host {owner.get('hostname')}, pid {owner.get('pid')}, since {since}"


def _policy_name(p: RetentionPolicy) -> str:
    if isinstance(p, KeepLast):
        return f"keep-last {p.k}"
    if isinstance(p, KeepEvery):
        return f"keep-every {p.n}"
    if isinstance(p, KeepBest):
        return f"keep-best {p.metric}:{p.mode}:{p.k}"
    return repr(p)


def _why_kept(infos: Sequence[CheckpointInfo], policies: Sequence[RetentionPolicy],
              protected: set[int]) -> dict[int, list[str]]:
    """Why each step stays (for the report only: ``steps_to_delete`` decides)."""
    why: dict[int, list[str]] = {c.step: [] for c in infos}
    for p in policies:
        for s in p.keep(infos):
            why[s].append(_policy_name(p))
    newest = newest_valid(infos)
    for c in infos:
        if newest is not None and c.step == newest.step:
            why[c.step].append("newest valid")
        if c.step in protected:
            why[c.step].append("incomplete (kept without --incomplete)")
        if c.status == "corrupt" and (newest is None or c.step > newest.step):
            why[c.step].append("corrupt, newer than the newest valid: left for inspection")
        if not policies and c.valid:
            why[c.step].append("no retention policy")
    return why


def _info_json(c: CheckpointInfo) -> dict[str, Any]:
    return {"step": c.step, "path": c.path, "status": c.status, "size_bytes": c.size_bytes,
            "created_unix": c.created_unix, "metrics": dict(c.metrics), "reason": c.reason}


def gc(
    root: PathLike,
    *,
    keep_last: int | None = None,
    keep_every: int | None = None,
    keep_best: tuple[str, str] | tuple[str, str, int] | None = None,
    policies: Iterable[RetentionPolicy] | None = None,
    incomplete: bool = False,
    dry_run: bool = False,
    force: bool = False,
    storage_options: StorageOptions = None,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Apply retention to the step checkpoints under ``root`` as a manager would
    (call order in the module docstring); return what was (or, with ``dry_run``,
    would be) deleted and what is kept, and why.

    Policies are ``CheckpointManager``'s: ``keep_last``, ``keep_every``,
    ``keep_best=(metric, "min"|"max"[, k])``, extra ``policies``; a checkpoint is
    kept if any keeps it, and the newest valid one always is. Corrupt checkpoints
    older than the newest valid one are deleted, newer ones kept for inspection.
    Incomplete ones (a crashed save, or one in flight) are kept unless
    ``incomplete=True``. With no policy, valid checkpoints are all kept.

    Raises ``CheckpointExistsError`` while a live manager owns ``root`` (unless
    ``force``; ``dry_run`` only reports the owner), ``CheckpointNotFoundError`` if
    ``root`` does not exist. Deletion failures are listed in ``failed``.
    """
    chosen = build_policies(keep_last, keep_every, keep_best, policies)
    if not chosen and not incomplete:
        raise ValueError("nothing to do: give a retention policy (keep_last, keep_every, keep_best) "
                         "and/or incomplete=True")
    storage = _existing(root, storage_options)
    croot = CheckpointRoot(storage)
    owner = _owner_of(storage)
    live = owner is not None and owner["live"]
    if owner is not None and live and not (force or dry_run):
        raise CheckpointExistsError(
            f"{croot.url} is owned by a running CheckpointManager ({describe_owner(owner)}); not deleting "
            "while it saves and applies its own retention there. Stop it first, or pass force=True "
            "(--force; its owner marker is then left in place)", path=croot.url, owner=owner)
    marker = None if dry_run or live else croot.owner()
    if marker is not None:
        marker.acquire()  # refuses a live owner that appeared meanwhile; takes over a stale one
    try:
        infos = croot.list()
        protected = set() if incomplete else {c.step for c in infos if c.status == "incomplete"}
        doomed = steps_to_delete(infos, chosen, in_flight=protected)
        why = _why_kept(infos, chosen, protected)
        deleted, failed = [], []
        for i, c in enumerate(doomed):
            if dry_run:
                deleted.append(c)
                continue
            _tick(progress, f"step {c.step}", i, len(doomed))
            try:
                croot.delete(c.step)
                deleted.append(c)
            except OSError as e:
                failed.append({**_info_json(c), "error": f"{type(e).__name__}: {e}"})
        if doomed and not dry_run:
            _tick(progress, "", len(doomed), len(doomed))
    finally:
        if marker is not None:
            marker.release()
    gone = {c.step for c in doomed}
    return {
        "root": croot.url,
        "dry_run": dry_run,
        "forced": bool(live and force and not dry_run),
        "owner": owner,
        "policies": [_policy_name(p) for p in chosen],
        "incomplete": incomplete,
        "delete": [_info_json(c) for c in deleted],
        "failed": failed,
        "keep": [{**_info_json(c), "why": why[c.step]} for c in infos if c.step not in gone],
        "freed_bytes": sum(c.size_bytes or 0 for c in deleted),
    }

