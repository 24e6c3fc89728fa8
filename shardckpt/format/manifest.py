"""The manifest: a versioned JSON document that is the checkpoint's only index.

A checkpoint exists once ``manifest.json`` is committed. It lists every stored
byte: for each key, its kind, dtype and global shape, and the stored slices, each
pointing at a byte range of a shard file cut into CRC32C-checked chunks. The
manifest carries its own CRC32C over its canonical JSON text.

Decoding validates everything a hostile or damaged manifest could get wrong
(types, ranges, sizes, paths escaping the checkpoint) and raises
``CorruptCheckpointError``; nothing on disk is trusted before that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import CorruptCheckpointError
from ..native.crc32c import crc32c
from ._validate import CODECS, DATA_DIR, validate_relpath
from ._validate import Bad as _Bad
from ._validate import blob as _blob
from ._validate import finite_float as _finite_float
from ._validate import int_list as _int_list
from ._validate import nonneg_int as _nonneg_int
from ._validate import req as _req
from .entries import BlobRef, ChunkInfo, Entry, LaidOutShards, ObjectEntry, TensorEntry, TensorShard
from .grid import Grid, Layout, LayoutError, Writers
from .index import Indexes
from .jsoncodec import JsonValueError
from .jsoncodec import decode as json_decode
from .jsoncodec import encode as json_encode
from .layout import DTYPES

__all__ = [
    "FORMAT",
    "VERSION",
    "MANIFEST_NAME",
    "DATA_DIR",
    "CODECS",
    "ChunkInfo",
    "BlobRef",
    "TensorShard",
    "TensorEntry",
    "ObjectEntry",
    "Manifest",
    "encode_manifest",
    "header_fields",
    "decode_manifest",
    "validate_relpath",
]

FORMAT = "shardckpt"
#: Version 2 adds laid-out tensors and per-rank indexes; a manifest without them is
#: still written as version 1, byte for byte as before.
VERSION = 2
MANIFEST_NAME = "manifest.json"
_ENCODINGS = ("json", "bytes", "bytesio", "torch")
_BYTESIO_HEADER = 8  # a bytesio payload starts with its u64 stream position (format/objects.py)
ReadIndex = Callable[[str], bytes]


@dataclass(frozen=True)
class Manifest:
    save_id: str
    world_size: int
    created_unix: float
    chunk_bytes: int
    files: Mapping[str, int]  # relative path -> size in bytes (shard files and indexes)
    entries: Mapping[str, Entry]
    library: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    version: int = 1
    indexes: Mapping[int, tuple[str, int]] = field(default_factory=dict)  # rank -> (file, crc32c)
    source: Indexes | None = field(default=None, compare=False, repr=False)

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


# ---------------------------------------------------------------- encoding


def _blob_json(b: BlobRef) -> dict[str, Any]:
    return {
        "file": b.file,
        "offset": b.offset,
        "chunks": [[c.codec, c.raw_len, c.stored_len, c.crc32c] for c in b.chunks],
    }


def _entry_json(e: Entry) -> dict[str, Any]:
    if isinstance(e, TensorEntry):
        out: dict[str, Any] = {"kind": "tensor", "dtype": e.dtype, "shape": list(e.shape), "key_path": list(e.key_path)}
        if e.layout is not None:
            out["layout"] = e.layout.to_json()
        else:
            out["shards"] = [{"offsets": list(s.offsets), "sizes": list(s.sizes), **_blob_json(s.blob)}
                             for s in e.shards]
        return out
    out = {"kind": "object", "encoding": e.encoding, "key_path": list(e.key_path)}
    if e.blob is None:
        out["value"] = e.value
    else:
        out.update(_blob_json(e.blob))
    return out


def header_fields(m: Manifest) -> dict[str, Any]:
    """The manifest's scalar fields as stored (``inspect`` shows the same)."""
    return {"save_id": m.save_id, "world_size": m.world_size, "created_unix": m.created_unix,
            "chunk_bytes": m.chunk_bytes, "library": dict(m.library), "metadata": dict(m.metadata)}


def encode_manifest(m: Manifest) -> bytes:
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": m.version,
        "body": {
            **header_fields(m),
            "files": {k: {"size": v} for k, v in m.files.items()},
            "entries": {k: _entry_json(v) for k, v in m.entries.items()},
        },
    }
    if m.version >= 2:
        doc["body"]["indexes"] = {rel: {"rank": r, "crc32c": f"{crc:08x}"} for r, (rel, crc) in m.indexes.items()}
    # checked: every value here is a JSON value (the builder normalized the metadata,
    # inline object values passed jsoncodec.is_exact when they were encoded)
    doc["crc32c"] = f"{crc32c(json_encode(doc, checked=True)):08x}"
    return json_encode(doc, checked=True)


# ---------------------------------------------------------------- decoding


def _key_path(v: Any, where: str) -> tuple[str | int, ...]:
    if not isinstance(v, list) or not v:
        raise _Bad(f"{where}.key_path: expected a non-empty list")
    for x in v:
        if not isinstance(x, (str, int)) or isinstance(x, bool):
            raise _Bad(f"{where}.key_path: element {x!r} is not a string or integer")
    return tuple(v)


def _tensor_entry(key: str, d: dict[str, Any], files: Mapping[str, int], max_chunk: int,
                  version: int, world_size: int) -> TensorEntry:
    where = f"entries[{key!r}]"
    dtype = _req(d, "dtype", str, where)
    if dtype not in DTYPES:
        raise _Bad(f"{where}: unsupported dtype {dtype!r}")
    itemsize = DTYPES[dtype].itemsize
    shape = _int_list(_req(d, "shape", list, where), f"{where}.shape")
    kp = _key_path(d.get("key_path"), where)
    if "layout" in d and version >= 2:
        if "shards" in d:
            raise _Bad(f"{where}: has both a layout and listed shards")
        ld = _req(d, "layout", dict, where)
        if set(ld) != {"grid", "writers"}:
            raise _Bad(f"{where}.layout: expected exactly 'grid' and 'writers'")
        try:
            grid = Grid.from_json(ld["grid"], shape)
            writers = Writers.from_json(ld["writers"], grid.num_boxes, world_size)
        except LayoutError as e:
            raise _Bad(f"{where}.layout: {e}") from None
        layout = Layout(grid, writers)
        return TensorEntry(dtype, shape, LaidOutShards(key, layout), kp, layout=layout)
    shards = []
    for i, s in enumerate(_req(d, "shards", list, where)):
        sw = f"{where}.shards[{i}]"
        offsets = _int_list(_req(s, "offsets", list, sw), f"{sw}.offsets")
        sizes = _int_list(_req(s, "sizes", list, sw), f"{sw}.sizes")
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            raise _Bad(f"{sw}: offsets/sizes rank differs from shape {list(shape)}")
        if any(o + n > g for o, n, g in zip(offsets, sizes, shape)):
            raise _Bad(f"{sw}: slice {list(offsets)}+{list(sizes)} exceeds shape {list(shape)}")
        blob = _blob(s, files, sw, max_chunk)
        if blob.raw_len != math.prod(sizes) * itemsize:
            raise _Bad(f"{sw}: chunks hold {blob.raw_len} bytes, slice needs {math.prod(sizes) * itemsize}")
        if any(c.raw_len % itemsize for c in blob.chunks):
            raise _Bad(f"{sw}: a chunk splits a {dtype} element")
        shards.append(TensorShard(offsets, sizes, blob))
    return TensorEntry(dtype, shape, tuple(shards), kp)


def _object_entry(key: str, d: dict[str, Any], files: Mapping[str, int], max_chunk: int) -> ObjectEntry:
    where = f"entries[{key!r}]"
    enc = _req(d, "encoding", str, where)
    if enc not in _ENCODINGS:
        raise _Bad(f"{where}: unknown object encoding {enc!r}")
    kp = _key_path(d.get("key_path"), where)
    if "file" in d:
        blob = _blob(d, files, where, max_chunk, raw_only=True)
        if enc == "bytesio" and blob.raw_len < _BYTESIO_HEADER:
            raise _Bad(f"{where}: a bytesio blob of {blob.raw_len} bytes has no {_BYTESIO_HEADER}-byte header")
        return ObjectEntry(enc, kp, blob=blob)  # type: ignore[arg-type]
    if enc != "json" or "value" not in d:
        raise _Bad(f"{where}: inline objects must be JSON with a 'value'")
    return ObjectEntry("json", kp, value=d["value"])


def _indexes(body: dict[str, Any], files: Mapping[str, int], world_size: int) -> dict[int, tuple[str, int]]:
    out: dict[int, tuple[str, int]] = {}
    for rel, info in _req(body, "indexes", dict, "body").items():
        where = f"indexes[{rel!r}]"
        if rel not in files:
            raise _Bad(f"{where}: index file is not listed in the manifest's files")
        rank = _nonneg_int(_req(info, "rank", int, where), f"{where}.rank")
        crc = _req(info, "crc32c", str, where)
        if set(info) != {"rank", "crc32c"} or rank >= world_size or rank in out:
            raise _Bad(f"{where}: expected a distinct rank < {world_size} and a crc32c only")
        if len(crc) != 8 or any(ch not in "0123456789abcdef" for ch in crc):
            raise _Bad(f"{where}.crc32c: {crc!r} is not 8 lowercase hex digits")
        out[rank] = (rel, int(crc, 16))
    return out


def _no_storage(rel: str) -> bytes:
    raise FileNotFoundError(f"{rel}: this manifest was decoded without access to its checkpoint")


def decode_manifest(data: bytes, source: str = MANIFEST_NAME, read_index: ReadIndex | None = None,
                    url: str = "") -> Manifest:
    """Parse and validate a manifest; raise ``CorruptCheckpointError`` naming what is wrong.

    ``read_index(rel)`` reads a per-rank index (``url`` names the checkpoint in
    errors); without it, the slices of laid-out tensors cannot be looked up."""
    try:
        try:
            doc = json_decode(data)
        except JsonValueError as e:
            raise _Bad(f"not valid JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise _Bad(f"not a {FORMAT} manifest")
        version = _req(doc, "version", int, "manifest")
        if version > VERSION:
            raise _Bad(f"format version {version} is newer than this shardckpt supports ({VERSION})")
        stored_crc = _req(doc, "crc32c", str, "manifest")
        body_doc = {k: v for k, v in doc.items() if k != "crc32c"}
        if stored_crc != f"{crc32c(json_encode(body_doc, checked=True)):08x}":
            raise _Bad("manifest CRC32C mismatch (the manifest was modified or damaged)")
        # The CRC covers the parsed document; requiring the exact canonical bytes too
        # makes every byte of the file count (an escape's hex case, a float's
        # redundant digit, an exponent's 'E' or added whitespace parse the same).
        if data != json_encode(doc, checked=True):
            raise _Bad("manifest bytes are not in canonical form (the manifest was modified or damaged)")
        body = _req(doc, "body", dict, "manifest")
        files: dict[str, int] = {}
        for name, info in _req(body, "files", dict, "body").items():
            files[validate_relpath(name)] = _nonneg_int(_req(info, "size", int, f"files[{name!r}]"), name)
        chunk_bytes = _nonneg_int(_req(body, "chunk_bytes", int, "body"), "chunk_bytes")
        world_size = _nonneg_int(_req(body, "world_size", int, "body"), "world_size")
        save_id = _req(body, "save_id", str, "body")
        indexes = _indexes(body, files, world_size) if version >= 2 else {}
        entries: dict[str, Entry] = {}
        for key, e in _req(body, "entries", dict, "body").items():
            kind = _req(e, "kind", str, f"entries[{key!r}]")
            if kind == "tensor":
                entries[key] = _tensor_entry(key, e, files, chunk_bytes, version, world_size)
            elif kind == "object":
                entries[key] = _object_entry(key, e, files, chunk_bytes)
            else:
                raise _Bad(f"entries[{key!r}]: unknown kind {kind!r}")
        laid_out = [e for e in entries.values() if isinstance(e, TensorEntry) and e.layout is not None]
        if version >= 2 and not laid_out:
            raise _Bad("a version 2 manifest without laid-out tensors (written as version 1)")
        indexes_src = None
        if laid_out:
            indexes_src = Indexes(read_index or _no_storage, url or source, save_id, indexes, files,
                                  entries, chunk_bytes)
            for e in laid_out:
                e.shards.source = indexes_src  # type: ignore[attr-defined]
        return Manifest(
            save_id=save_id,
            world_size=world_size,
            created_unix=_finite_float(_req(body, "created_unix", (int, float), "body"), "created_unix"),
            chunk_bytes=chunk_bytes,
            files=files,
            entries=entries,
            library=_req(body, "library", dict, "body"),
            metadata=_req(body, "metadata", dict, "body"),
            version=version,
            indexes=indexes,
            source=indexes_src,
        )
    except _Bad as e:
        raise CorruptCheckpointError(f"{source}: {e}", file=source) from None
    except RecursionError:  # re-encoding a document nested too deeply to check its CRC
        raise CorruptCheckpointError(f"{source}: nested too deeply", file=source) from None
