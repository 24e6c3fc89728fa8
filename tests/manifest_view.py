"""The decoded manifest of a checkpoint as plain dicts, in the shape of a version 1
manifest's entries: tests that inspect stored slices read them the same way
whether the slices are listed in the manifest or laid out in per-rank indexes."""

from __future__ import annotations

import os
from typing import Any

from shardckpt.format.manifest import ObjectEntry, TensorEntry
from shardckpt.store import CheckpointDir

__all__ = ["entries_view"]


def _blob(b: Any) -> dict[str, Any]:
    return {"file": b.file, "offset": b.offset,
            "chunks": [[c.codec, c.raw_len, c.stored_len, c.crc32c] for c in b.chunks]}


def entries_view(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    m = CheckpointDir.at(os.fspath(path)).read_manifest()
    out: dict[str, dict[str, Any]] = {}
    for key, e in m.entries.items():
        if isinstance(e, TensorEntry):
            out[key] = {"kind": "tensor", "dtype": e.dtype, "shape": list(e.shape), "laid_out": e.layout is not None,
                        "shards": [{"offsets": list(s.offsets), "sizes": list(s.sizes), **_blob(s.blob)}
                                   for s in e.shards]}
        else:
            assert isinstance(e, ObjectEntry)
            out[key] = {"kind": "object", "encoding": e.encoding, **(_blob(e.blob) if e.blob else {"value": e.value})}
    return out
