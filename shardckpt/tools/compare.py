"""``shardckpt.tools.diff``: what differs between two checkpoints.

Keys only in one, dtype or shape changes, and content changes: decided from the
manifests' chunk CRC32Cs where both store a tensor with the same layout (same
slices, chunking and codecs), else by reading both (in batches of about
``DIFF_READ_BUDGET`` bytes each). ``values=True`` reads every tensor both hold and
reports the largest absolute difference.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..api import load
from ..errors import ShardckptError
from ..format import jsoncodec
from ..format.layout import dtype_from_name
from ..format.manifest import Entry, ObjectEntry, TensorEntry
from ..store import CheckpointDir

__all__ = ["diff", "DIFF_READ_BUDGET", "ProgressCallback", "tick"]

PathLike = str | os.PathLike[str]
StorageOptions = Mapping[str, Any] | None
#: ``progress(label, done, total)``: called before each unit of work with the units
#: finished so far and what starts now, and once with ``done == total`` at the end.
ProgressCallback = Callable[[str, int, int], None]


def tick(progress: ProgressCallback | None, label: str, done: int, total: int) -> None:
    if progress is not None:
        progress(label, done, total)

#: ``diff`` reads tensors in batches of about this many raw bytes per checkpoint,
#: so comparing two large checkpoints never holds more than twice this (plus the
#: largest single tensor) in memory.
DIFF_READ_BUDGET = 256 << 20
_BLOCK = 1 << 22  # elements per step of the value statistics (bounds float64 temporaries)


def _type_of(e: Entry) -> str:
    return f"{e.dtype}{list(e.shape)}" if isinstance(e, TensorEntry) else f"object:{e.encoding}"


def _by_crc(a: TensorEntry, b: TensorEntry) -> str | None:
    """``"same"`` / ``"changed"`` when the stored layouts match (same slices, chunking
    and codecs) and the chunk CRC32Cs decide it; None when the data must be read.

    Equal CRCs of equally encoded chunks mean equal bytes (a miss needs a 32-bit
    collision per changed chunk); different CRCs of *raw* chunks mean different
    values; different CRCs of compressed chunks may be the same values encoded
    with other settings, so those are read."""
    sa, sb = sorted(a.shards, key=lambda s: s.offsets), sorted(b.shards, key=lambda s: s.offsets)
    if len(sa) != len(sb):
        return None
    changed = False
    for x, y in zip(sa, sb):
        if (x.offsets, x.sizes, len(x.blob.chunks)) != (y.offsets, y.sizes, len(y.blob.chunks)):
            return None
        for cx, cy in zip(x.blob.chunks, y.blob.chunks):
            if (cx.codec, cx.raw_len) != (cy.codec, cy.raw_len):
                return None
            if (cx.crc32c, cx.stored_len) != (cy.crc32c, cy.stored_len):
                if cx.codec != "raw":
                    return None
                changed = True
    return "changed" if changed else "same"


def _canonical(value: Any) -> bytes | str:
    """One form per value for comparing: canonical JSON where JSON holds it exactly."""
    return jsoncodec.encode(value) if jsoncodec.is_exact(value) else repr(value)


def _same_object(key: str, a: ObjectEntry, b: ObjectEntry, pa: str, pb: str, opts: StorageOptions) -> bool:
    """Objects compare by their stored form: inline JSON by value, blobs by their
    chunks' CRC32C (stored raw: a different CRC is a different payload)."""
    if a.blob is None and b.blob is None:
        return _canonical(a.value) == _canonical(b.value)
    if a.blob is not None and b.blob is not None:
        return [(c.raw_len, c.crc32c) for c in a.blob.chunks] == [(c.raw_len, c.crc32c) for c in b.blob.chunks]
    # One inline, one in a shard (a JSON value near the inline limit): compare values.
    return _canonical(_read(pa, {key: None}, opts)[key]) == _canonical(_read(pb, {key: None}, opts)[key])


def _read(path: str, placeholders: dict[str, Any], opts: StorageOptions) -> dict[str, Any]:
    """Values through ``load`` (every chunk CRC-checked, objects decoded safely) into
    single-process placeholders, with flat keys so DCP looks up exactly these names."""
    try:
        load(placeholders, path, strict=False, storage_options=opts)
    except ShardckptError as e:  # name the checkpoint: a diff reads two
        attrs = {k: v for k, v in vars(e).items() if k != "rank_errors"}
        raise type(e)(f"{path}: {e}", **attrs) from e
    return placeholders


def _zeros(entries: Mapping[str, TensorEntry]) -> dict[str, Any]:
    return {k: torch.zeros(e.shape, dtype=dtype_from_name(e.dtype)) for k, e in entries.items()}


def _batches(entries: Mapping[str, TensorEntry], budget: int) -> list[list[str]]:
    """Keys in groups of about ``budget`` raw bytes (a larger tensor is a group alone)."""
    out: list[list[str]] = []
    size = 0
    for k, e in entries.items():
        n = sum(s.blob.raw_len for s in e.shards)
        if not out or size + n > budget:
            out.append([])
            size = 0
        out[-1].append(k)
        size += n
    return out


def _value_stats(x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """``differing``: elements whose values differ (NaN equals NaN); ``max_abs_diff``:
    the largest ``|a - b|`` over elements finite on both sides (None if there are none)."""
    fx, fy = x.reshape(-1), y.reshape(-1)
    wide = torch.complex128 if x.is_complex() else torch.float64
    differing, biggest = 0, None
    for i in range(0, fx.numel(), _BLOCK):
        a, b = fx[i : i + _BLOCK], fy[i : i + _BLOCK]
        wa, wb = a.to(wide), b.to(wide)
        if x.is_floating_point() or x.is_complex():
            ne = (wa != wb) & ~(torch.isnan(wa) & torch.isnan(wb))
        else:  # integers compare exactly in their own dtype (float64 would round above 2**53)
            ne = a != b
        differing += int(ne.sum())
        d = (wa - wb).abs()[torch.isfinite(wa) & torch.isfinite(wb)]
        if d.numel():
            m = float(d.max())
            biggest = m if biggest is None else max(biggest, m)
    return {"max_abs_diff": biggest, "differing": differing, "elements": fx.numel()}


def diff(
    a: PathLike,
    b: PathLike,
    *,
    values: bool = False,
    storage_options: StorageOptions = None,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Compare two checkpoints key by key.

    Reports keys only in ``a`` / only in ``b``, type changes (dtype, shape, tensor
    vs object) and content changes. Where two tensors' stored layouts match (same
    slices, chunking and codecs), chunk CRC32Cs decide without reading data;
    otherwise (another world size or chunk size, other codecs) both are read and
    compared bit for bit, so a resharded save of the same values is unchanged.
    ``values`` reads every tensor present in both with the same dtype and shape
    and reports, per key, ``max_abs_diff`` and the number of ``differing``
    elements (``values`` in the result). Manifests and shard sizes are always
    checked; chunk CRCs against the data only where data is read, so without
    ``values`` a damaged copy can compare equal to its original (``verify``
    checks the data).
    """
    pa, pb = os.fspath(a), os.fspath(b)
    ca, cb = CheckpointDir.at(pa, storage_options), CheckpointDir.at(pb, storage_options)
    ma, mb = ca.read_checked(), cb.read_checked()
    type_changed: dict[str, dict[str, str]] = {}
    changed: dict[str, dict[str, Any]] = {}
    unchanged: list[str] = []
    by_crc = 0
    to_read: dict[str, tuple[TensorEntry, TensorEntry]] = {}
    for key in sorted(set(ma.entries) & set(mb.entries)):
        ea, eb = ma.entries[key], mb.entries[key]
        if _type_of(ea) != _type_of(eb):
            type_changed[key] = {"a": _type_of(ea), "b": _type_of(eb)}
        elif isinstance(ea, TensorEntry) and isinstance(eb, TensorEntry):
            verdict = None if values else _by_crc(ea, eb)
            if verdict == "same":
                unchanged.append(key)
            elif verdict == "changed":
                changed[key] = {"compared": "crc"}
            else:
                to_read[key] = (ea, eb)
            by_crc += verdict is not None
        elif isinstance(ea, ObjectEntry) and isinstance(eb, ObjectEntry):
            if _same_object(key, ea, eb, pa, pb, storage_options):
                unchanged.append(key)
            else:
                changed[key] = {"compared": "crc" if ea.blob is not None and eb.blob is not None else "value"}
    stats = _compare_by_reading(to_read, (pa, pb), values, storage_options, progress, unchanged, changed)
    only_a, only_b = sorted(set(ma.entries) - set(mb.entries)), sorted(set(mb.entries) - set(ma.entries))
    return {
        "a": {"path": ca.url, "world_size": ma.world_size, "keys": len(ma.entries), "created_unix": ma.created_unix},
        "b": {"path": cb.url, "world_size": mb.world_size, "keys": len(mb.entries), "created_unix": mb.created_unix},
        "identical": not (only_a or only_b or type_changed or changed),
        "only_in_a": only_a,
        "only_in_b": only_b,
        "type_changed": type_changed,
        "content_changed": dict(sorted(changed.items())),
        "unchanged": sorted(unchanged),
        "compared": {"by_crc": by_crc, "by_reading": len(to_read)},
        "values": dict(sorted(stats.items())) if values else None,
        "metadata_changed": {k: {"a": ma.metadata.get(k), "b": mb.metadata.get(k)}
                             for k in sorted(set(ma.metadata) | set(mb.metadata))
                             if _canonical(ma.metadata.get(k)) != _canonical(mb.metadata.get(k))},
    }


def _compare_by_reading(to_read: dict[str, tuple[TensorEntry, TensorEntry]], paths: tuple[str, str], values: bool,
                        opts: StorageOptions, progress: ProgressCallback | None, unchanged: list[str],
                        changed: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Read the tensors CRCs could not decide, a budget's worth at a time from each
    side, and compare them bit for bit (``values``: their statistics per key too)."""
    pa, pb = paths
    done = 0
    stats: dict[str, dict[str, Any]] = {}
    for batch in _batches({k: ea for k, (ea, _) in to_read.items()}, DIFF_READ_BUDGET):
        tick(progress, batch[0] if len(batch) == 1 else f"{batch[0]} (+{len(batch) - 1})", done, len(to_read))
        ta = _read(pa, _zeros({k: to_read[k][0] for k in batch}), opts)
        tb = _read(pb, _zeros({k: to_read[k][1] for k in batch}), opts)
        for key in batch:
            x, y = ta.pop(key), tb.pop(key)
            if torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
                unchanged.append(key)
            else:
                changed[key] = {"compared": "read"}
            if values:
                stats[key] = _value_stats(x, y)
        done += len(batch)
    if to_read:
        tick(progress, "", len(to_read), len(to_read))
    return stats
