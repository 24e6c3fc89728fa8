"""Verifying a checkpoint without loading it: every chunk's CRC32C, and every
encoded chunk decoded (a chunk whose CRC matches but that does not decode
would pass a CRC-only check and fail ``load``)."""

from __future__ import annotations

import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import CheckpointReadError, CorruptCheckpointError
from ..format.chunks import check_chunk, check_decodes_bounded
from ..format.manifest import BlobRef, Manifest, ObjectEntry, TensorEntry
from ..native.crc32c import implementation as crc_implementation
from .checkpoint import CheckpointDir

__all__ = ["VerifyReport", "verify_dir"]


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` checked."""

    path: str
    files: int
    chunks: int
    bytes_checked: int
    seconds: float
    crc_implementation: str
    manifest: Manifest = field(repr=False)


def _blobs(m: Manifest, broken: Collection[int] = ()) -> list[tuple[str, BlobRef]]:
    """Every stored blob, except those described by the ``broken`` ranks' indexes."""
    out = []
    for key, e in m.entries.items():
        if isinstance(e, TensorEntry) and e.layout is not None:
            w = e.layout.writers
            out += [(key, e.shards[j].blob) for j in range(e.num_shards) if w.of(j) not in broken]
        elif isinstance(e, TensorEntry):
            out += [(key, s.blob) for s in e.shards]
        elif isinstance(e, ObjectEntry) and e.blob is not None:
            out.append((key, e.blob))
    return out


def verify_dir(ckpt: CheckpointDir, share: tuple[int, int] = (0, 1)) -> VerifyReport:
    """Check the manifest, every shard file's size, every chunk's CRC32C and decoding.

    ``share=(i, n)`` checks only the i-th of n disjoint shares of the data (the
    manifest and sizes are always checked), so n ranks verify a checkpoint
    together in 1/n of the time; the union of all shares is the whole check.

    Raises ``CorruptCheckpointError`` listing every damaged place (``damaged``),
    ``IncompleteCheckpointError`` / ``CheckpointNotFoundError`` when there is
    nothing committed to verify.
    """
    t0 = time.perf_counter()
    storage = ckpt.storage
    manifest = ckpt.read_manifest(fresh=True)  # indexes too: never what an earlier read cached
    wrong_size = ckpt.size_mismatches(manifest.files)
    damaged = [CorruptCheckpointError(f"{rel}: {why}", file=rel) for rel, why in wrong_size.items()]
    good_files = set(manifest.files) - set(wrong_size)
    broken = manifest.source.damaged() if manifest.source is not None else {}
    damaged += [e for r, e in sorted(broken.items()) if e.file not in wrong_size]

    def check(job: tuple[str, BlobRef]) -> tuple[int, int, list[CorruptCheckpointError]]:
        key, blob = job
        try:
            return _check_blob(key, blob)
        except (OSError, EOFError) as e:
            # The sizes were checked: this is a failed read, not damage (retention
            # deletes corrupt steps, so it must not be reported as one).
            raise CheckpointReadError(f"verifying {storage.url}: reading {blob.file} failed: "
                                      f"{type(e).__name__}: {e}", path=storage.url, file=blob.file, key=key) from e

    def _check_blob(key: str, blob: BlobRef) -> tuple[int, int, list[CorruptCheckpointError]]:
        reader = storage.open_reader(blob.file)
        errs: list[CorruptCheckpointError] = []
        pos, buf = blob.offset, bytearray()
        try:
            for i, c in enumerate(blob.chunks):
                if len(buf) < c.stored_len:
                    buf = bytearray(c.stored_len)
                view = memoryview(buf)[: c.stored_len]
                reader.read_into(pos, view)
                try:
                    check_chunk(view, c.crc32c, blob.file, key, i, pos)
                    if c.codec != "raw":  # never allocates raw_len: it may be a bomb's claim
                        check_decodes_bounded(view, c, blob.file, key, i)
                except CorruptCheckpointError as e:
                    errs.append(e)
                pos += c.stored_len
        finally:
            reader.close()
        return len(blob.chunks), pos - blob.offset, errs

    index, count = share
    if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
        raise ValueError(f"share must be (i, n) with 0 <= i < n, got {share!r}")
    jobs = [j for j in _blobs(manifest, broken) if j[1].file in good_files][index::count]
    chunks = nbytes = 0
    with ThreadPoolExecutor(max_workers=storage.knobs.io_threads) as pool:
        for n, b, errs in [f.result() for f in [pool.submit(check, j) for j in jobs]]:
            chunks, nbytes = chunks + n, nbytes + b
            damaged += errs
    if damaged:
        first = damaged[0]
        raise CorruptCheckpointError(
            f"{storage.url}: {len(damaged)} damaged place(s): " + "; ".join(str(d) for d in damaged[:10]),
            file=first.file, key=first.key, chunk=first.chunk, damaged=damaged,
        )
    return VerifyReport(
        path=storage.url, files=len(manifest.files), chunks=chunks, bytes_checked=nbytes,
        seconds=time.perf_counter() - t0, crc_implementation=crc_implementation(), manifest=manifest,
    )
