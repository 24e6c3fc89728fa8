"""Listing a run's steps across tiers (``CheckpointManager.list``, ``shardckpt ls``).
Reads manifests and markers only; takes no lock, writes nothing."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ...backends import open_storage
from ...store import CheckpointRoot
from ...store.retention import CheckpointInfo
from .local_commit import COMMIT_NAME
from .local_tier import root_infos

__all__ = ["list_local", "merge_tiers", "is_local_root", "tier_rows"]


def list_local(local_root: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """The local tier's steps as this node sees them (``tiers=("local",)``), oldest first."""
    storage = open_storage(local_root)
    if not storage.exists():
        return []
    return root_infos(CheckpointRoot(storage))


def merge_tiers(remote: Sequence[CheckpointInfo], local: Sequence[CheckpointInfo]) -> list[CheckpointInfo]:
    """One entry per step, oldest first, ``tiers`` naming every tier holding a valid copy
    (the remote entry's path and metadata win where both hold it)."""
    by_step: dict[int, CheckpointInfo] = {}
    for c in remote:
        by_step[c.step] = replace(c, tiers=("remote",) if c.valid else ())
    for c in local:
        have = by_step.get(c.step)
        if have is None:
            by_step[c.step] = replace(c, tiers=("local",) if c.valid else ())
        elif c.valid:
            by_step[c.step] = replace(have if have.valid else c, tiers=("local", *have.tiers))
    return [by_step[s] for s in sorted(by_step)]


def is_local_root(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``path`` is a local tier's root: a step directory holding a commit
    marker or ``rank_*`` directories instead of a manifest."""
    try:
        root = CheckpointRoot(open_storage(path, storage_options))
        for step in root.steps()[-3:]:
            names = root.checkpoint(step).storage.listdir()
            if COMMIT_NAME in names or any(n.startswith("rank_") for n in names):
                return True
    except (OSError, ValueError):
        return False
    return False


def tier_rows(listed: list[dict[str, Any]], local_root: str, now: float) -> list[dict[str, Any]]:
    """``shardckpt ls --local-root``: the remote listing's JSON rows with a ``tiers``
    field, plus rows for steps only the local tier holds, by step."""
    local = {c.step: c for c in list_local(local_root)}
    rows = []
    for row in listed:
        c = local.pop(row["step"], None) if row["step"] is not None else None
        tiers = (["local"] if c is not None and c.valid else []) + (["remote"] if row["status"] == "valid" else [])
        rows.append({**row, "tiers": tiers})
    for c in local.values():
        rows.append({"name": os.path.basename(c.path.rstrip("/")), "path": c.path, "step": c.step,
                     "status": c.status, "size_bytes": c.size_bytes, "created_unix": c.created_unix,
                     "world_size": None, "metrics": dict(c.metrics), "reason": c.reason,
                     "tiers": ["local"] if c.valid else [],
                     "age_seconds": None if c.created_unix is None else round(now - c.created_unix, 3)})
    return sorted(rows, key=lambda r: (r["step"] is None, r["step"] or 0))
