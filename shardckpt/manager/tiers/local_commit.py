"""The commit marker of a local step: ``<local_root>/step_N/COMMIT.json``.

A local step is a directory per rank (``rank_R/``, each a committed shardckpt
checkpoint of that rank's local view) plus, once every rank reported its own
shard and its replicas written and CRC-verified, one marker per node. The
marker is what makes the step exist on that node: without it the directory is
an incomplete leftover (a crash mid-save), whatever rank directories are
there. It records what a restore must check before trusting the files: the
world size, every rank's node and replica holders, and a digest of every
rank's local layout (shapes, dtypes, DTensor placements), so a job of another
shape is sent to the durable tier instead of loading shards that do not fit.

JSON, canonical (sorted keys, no whitespace), with a CRC32C of the document
without its ``crc32c`` field: a torn or edited marker is corruption, named by
file, never trusted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...errors import CorruptCheckpointError
from ...format import jsoncodec
from ...native.crc32c import crc32c

__all__ = ["COMMIT_NAME", "LocalCommit", "encode_commit", "decode_commit"]

COMMIT_NAME = "COMMIT.json"
_VERSION = 1


@dataclass(frozen=True)
class LocalCommit:
    """What every rank agreed on when step ``step`` was committed to the local tier."""

    step: int
    world_size: int
    nodes: tuple[str, ...]  # rank -> node id at save time
    replicas: tuple[tuple[int, ...], ...]  # rank -> ranks holding a copy
    layouts: tuple[str, ...]  # rank -> digest of its local layout
    manifests: tuple[int, ...] = ()  # rank -> CRC32C of its local manifest's bytes: which copy is this save's
    metrics: Mapping[str, float | None] = field(default_factory=dict)
    created_unix: float = 0.0


def encode_commit(c: LocalCommit) -> bytes:
    doc: dict[str, Any] = {
        "version": _VERSION, "step": c.step, "world_size": c.world_size, "nodes": list(c.nodes),
        "replicas": [list(r) for r in c.replicas], "layouts": list(c.layouts), "manifests": list(c.manifests),
        "metrics": dict(c.metrics), "created_unix": c.created_unix,
    }
    doc["crc32c"] = crc32c(jsoncodec.encode(doc))
    return jsoncodec.encode(doc)


def decode_commit(data: bytes, where: str) -> LocalCommit:
    """Parse and check a marker; ``CorruptCheckpointError`` naming ``where`` if it is not one."""
    def bad(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{where}: local commit marker is damaged: {why}", file=where)

    try:
        doc = jsoncodec.decode(data)
    except jsoncodec.JsonValueError as e:
        raise bad(f"not JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("crc32c"), int):
        raise bad("no crc32c field")
    stored = doc.pop("crc32c")
    if jsoncodec.encode({**doc, "crc32c": stored}) != data:
        raise bad("not in canonical form (edited?)")
    if crc32c(jsoncodec.encode(doc)) != stored:
        raise bad(f"CRC32C mismatch: stored {stored:08x}, computed {crc32c(jsoncodec.encode(doc)):08x}")
    try:
        if doc["version"] != _VERSION:
            raise bad(f"unknown version {doc['version']!r}")
        w = doc["world_size"]
        nodes, replicas, layouts, manifests = doc["nodes"], doc["replicas"], doc["layouts"], doc["manifests"]
        ok = (_int(doc["step"]) and _int(w) and w >= 1
              and len(nodes) == len(replicas) == len(layouts) == len(manifests) == w
              and all(_int(m) for m in manifests)
              and all(isinstance(n, str) for n in nodes) and all(isinstance(x, str) for x in layouts)
              and all(isinstance(r, list) and all(_int(t) and 0 <= t < w for t in r) for r in replicas)
              and isinstance(doc["metrics"], dict) and isinstance(doc["created_unix"], (int, float))
              and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                      for v in doc["metrics"].values()))
    except (KeyError, TypeError) as e:
        raise bad(f"missing or mistyped field ({e})") from None
    if not ok:
        raise bad("fields out of range")
    return LocalCommit(doc["step"], w, tuple(nodes), tuple(tuple(r) for r in replicas), tuple(layouts),
                       tuple(manifests), dict(doc["metrics"]), float(doc["created_unix"]))


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0
