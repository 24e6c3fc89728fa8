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

import json
import math
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .._checksum import crc32c
from ..errors import CorruptCheckpointError
from . import codec as _codec
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
    "decode_manifest",
    "validate_relpath",
]

FORMAT = "shardckpt"
VERSION = 1
MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"
#: Chunk codecs this version can decode.
CODECS = frozenset(_codec.CODECS)
ObjectEncoding = Literal["json", "bytes", "bytesio", "torch"]
_ENCODINGS = ("json", "bytes", "bytesio", "torch")
_MAX_NAME, _MAX_PATH = 255, 1024
_BYTESIO_HEADER = 8  # a bytesio payload starts with its u64 stream position (format/objects.py)


@dataclass(frozen=True)
class ChunkInfo:
    codec: str
    raw_len: int
    stored_len: int
    crc32c: int


@dataclass(frozen=True)
class BlobRef:
    """A run of consecutive chunks in one shard file, starting at byte ``offset``."""

    file: str
    offset: int
    chunks: tuple[ChunkInfo, ...]

    @property
    def raw_len(self) -> int:
        return sum(c.raw_len for c in self.chunks)

    @property
    def stored_len(self) -> int:
        return sum(c.stored_len for c in self.chunks)


@dataclass(frozen=True)
class TensorShard:
    """One stored slice of a tensor: ``sizes`` elements at ``offsets`` of the global shape."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    blob: BlobRef


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    shards: tuple[TensorShard, ...]
    key_path: tuple[str | int, ...]


@dataclass(frozen=True)
class ObjectEntry:
    """A non-tensor value: inline JSON (``value``), or a blob of bytes / JSON / weights-only torch."""

    encoding: ObjectEncoding
    key_path: tuple[str | int, ...]
    value: Any = None
    blob: BlobRef | None = None


Entry = TensorEntry | ObjectEntry


@dataclass(frozen=True)
class Manifest:
    save_id: str
    world_size: int
    created_unix: float
    chunk_bytes: int
    files: Mapping[str, int]  # relative path -> size in bytes
    entries: Mapping[str, Entry]
    library: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    version: int = VERSION

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
        return {
            "kind": "tensor",
            "dtype": e.dtype,
            "shape": list(e.shape),
            "key_path": list(e.key_path),
            "shards": [
                {"offsets": list(s.offsets), "sizes": list(s.sizes), **_blob_json(s.blob)}
                for s in e.shards
            ],
        }
    out: dict[str, Any] = {"kind": "object", "encoding": e.encoding, "key_path": list(e.key_path)}
    if e.blob is None:
        out["value"] = e.value
    else:
        out.update(_blob_json(e.blob))
    return out


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def encode_manifest(m: Manifest) -> bytes:
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": m.version,
        "body": {
            "save_id": m.save_id,
            "world_size": m.world_size,
            "created_unix": m.created_unix,
            "chunk_bytes": m.chunk_bytes,
            "library": dict(m.library),
            "metadata": dict(m.metadata),
            "files": {k: {"size": v} for k, v in m.files.items()},
            "entries": {k: _entry_json(v) for k, v in m.entries.items()},
        },
    }
    doc["crc32c"] = f"{crc32c(_canonical(doc)):08x}"
    return _canonical(doc)


# ---------------------------------------------------------------- decoding


class _Bad(Exception):
    pass


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of duplicate keys silently; another reader might keep the first.
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dupes = sorted({k for k, _ in pairs if k in seen or seen.add(k)})
        raise ValueError(f"duplicate key(s) {dupes[:5]}")
    return out


def _req(d: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise _Bad(f"{where}: missing field {key!r}")
    v = d[key]
    # bool is an int subclass; never accept it where a number is meant.
    if not isinstance(v, typ) or (isinstance(v, bool) and bool not in _as_tuple(typ)):
        raise _Bad(f"{where}.{key}: expected {_tname(typ)}, got {type(v).__name__}")
    return v


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def _tname(t: type | tuple[type, ...]) -> str:
    return "/".join(x.__name__ for x in _as_tuple(t))


def _nonneg_int(v: Any, where: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise _Bad(f"{where}: expected a non-negative integer, got {v!r}")
    return v


def _finite_float(v: int | float, where: str) -> float:
    try:
        return float(v)
    except OverflowError:
        raise _Bad(f"{where}: {v} is out of range") from None


def _int_list(v: Any, where: str) -> tuple[int, ...]:
    if not isinstance(v, list):
        raise _Bad(f"{where}: expected a list of integers")
    return tuple(_nonneg_int(x, f"{where}[{i}]") for i, x in enumerate(v))


def validate_relpath(path: Any) -> str:
    """A path inside the checkpoint: relative, normalized, under ``data/``, no ``..``."""
    if not isinstance(path, str) or not path:
        raise _Bad(f"file path {path!r} is not a non-empty string")
    if path.startswith("/") or "\\" in path or ":" in path or "\x00" in path:
        raise _Bad(f"file path {path!r} is absolute or not a plain relative path")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or posixpath.normpath(path) != path:
        raise _Bad(f"file path {path!r} escapes or is not normalized within the checkpoint")
    if parts[0] != DATA_DIR or len(parts) < 2:
        raise _Bad(f"file path {path!r} is not under {DATA_DIR}/")
    # Longer names than any filesystem (255 bytes a name) or object store (1024 a key)
    # takes would fail in the backend with an untyped OS error.
    if len(path.encode("utf-8", "surrogatepass")) > _MAX_PATH or any(
        len(p.encode("utf-8", "surrogatepass")) > _MAX_NAME for p in parts
    ):
        raise _Bad(f"file path {path[:80]!r}... is longer than {_MAX_NAME} bytes a name or {_MAX_PATH} in all")
    return path


def _blob(d: dict[str, Any], files: Mapping[str, int], where: str, max_chunk: int, raw_only: bool = False) -> BlobRef:
    file = validate_relpath(_req(d, "file", str, where))
    if file not in files:
        raise _Bad(f"{where}: file {file!r} is not listed in the manifest's files")
    offset = _nonneg_int(_req(d, "offset", int, where), f"{where}.offset")
    chunks = []
    for i, c in enumerate(_req(d, "chunks", list, where)):
        cw = f"{where}.chunks[{i}]"
        if not isinstance(c, list) or len(c) != 4 or not isinstance(c[0], str):
            raise _Bad(f"{cw}: expected [codec, raw_len, stored_len, crc32c]")
        if c[0] not in CODECS:
            raise _Bad(f"{cw}: unknown codec {c[0]!r} (written by a newer shardckpt?)")
        raw, stored, crc = (_nonneg_int(x, cw) for x in c[1:])
        if crc > 0xFFFFFFFF:
            raise _Bad(f"{cw}: crc32c {crc} out of range")
        if c[0] == "raw" and raw != stored:
            raise _Bad(f"{cw}: raw chunk with raw_len {raw} != stored_len {stored}")
        if raw_only and c[0] != "raw":
            raise _Bad(f"{cw}: object blobs are stored raw, found codec {c[0]!r}")
        # Bounds what decoding may allocate, whatever a crafted manifest claims.
        if raw > max_chunk:
            raise _Bad(f"{cw}: raw_len {raw} exceeds the checkpoint's chunk size {max_chunk}")
        chunks.append(ChunkInfo(c[0], raw, stored, crc))
    blob = BlobRef(file, offset, tuple(chunks))
    if offset + blob.stored_len > files[file]:
        raise _Bad(f"{where}: bytes [{offset}, {offset + blob.stored_len}) exceed {file}'s size {files[file]}")
    return blob


def _key_path(v: Any, where: str) -> tuple[str | int, ...]:
    if not isinstance(v, list) or not v:
        raise _Bad(f"{where}.key_path: expected a non-empty list")
    for x in v:
        if not isinstance(x, (str, int)) or isinstance(x, bool):
            raise _Bad(f"{where}.key_path: element {x!r} is not a string or integer")
    return tuple(v)


def _tensor_entry(key: str, d: dict[str, Any], files: Mapping[str, int], max_chunk: int) -> TensorEntry:
    where = f"entries[{key!r}]"
    dtype = _req(d, "dtype", str, where)
    if dtype not in DTYPES:
        raise _Bad(f"{where}: unsupported dtype {dtype!r}")
    itemsize = DTYPES[dtype].itemsize
    shape = _int_list(_req(d, "shape", list, where), f"{where}.shape")
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
    return TensorEntry(dtype, shape, tuple(shards), _key_path(d.get("key_path"), where))


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


def decode_manifest(data: bytes, source: str = MANIFEST_NAME) -> Manifest:
    """Parse and validate a manifest; raise ``CorruptCheckpointError`` naming what is wrong."""
    try:
        try:
            doc = json.loads(data, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
        except (ValueError, UnicodeDecodeError, TypeError) as e:
            raise _Bad(f"not valid JSON ({e})") from None
        except RecursionError:
            raise _Bad("not valid JSON (nested too deeply)") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise _Bad(f"not a {FORMAT} manifest")
        version = _req(doc, "version", int, "manifest")
        if version > VERSION:
            raise _Bad(f"format version {version} is newer than this shardckpt supports ({VERSION})")
        stored_crc = _req(doc, "crc32c", str, "manifest")
        body_doc = {k: v for k, v in doc.items() if k != "crc32c"}
        if stored_crc != f"{crc32c(_canonical(body_doc)):08x}":
            raise _Bad("manifest CRC32C mismatch (the manifest was modified or damaged)")
        # The CRC covers the parsed document; requiring the exact canonical bytes too
        # makes every byte of the file count (an escape's hex case, a float's
        # redundant digit, an exponent's 'E' or added whitespace parse the same).
        if data != _canonical(doc):
            raise _Bad("manifest bytes are not in canonical form (the manifest was modified or damaged)")
        body = _req(doc, "body", dict, "manifest")
        files: dict[str, int] = {}
        for name, info in _req(body, "files", dict, "body").items():
            files[validate_relpath(name)] = _nonneg_int(_req(info, "size", int, f"files[{name!r}]"), name)
        chunk_bytes = _nonneg_int(_req(body, "chunk_bytes", int, "body"), "chunk_bytes")
        entries: dict[str, Entry] = {}
        for key, e in _req(body, "entries", dict, "body").items():
            kind = _req(e, "kind", str, f"entries[{key!r}]")
            if kind == "tensor":
                entries[key] = _tensor_entry(key, e, files, chunk_bytes)
            elif kind == "object":
                entries[key] = _object_entry(key, e, files, chunk_bytes)
            else:
                raise _Bad(f"entries[{key!r}]: unknown kind {kind!r}")
        return Manifest(
            save_id=_req(body, "save_id", str, "body"),
            world_size=_nonneg_int(_req(body, "world_size", int, "body"), "world_size"),
            created_unix=_finite_float(_req(body, "created_unix", (int, float), "body"), "created_unix"),
            chunk_bytes=chunk_bytes,
            files=files,
            entries=entries,
            library=_req(body, "library", dict, "body"),
            metadata=_req(body, "metadata", dict, "body"),
            version=version,
        )
    except _Bad as e:
        raise CorruptCheckpointError(f"{source}: {e}", file=source) from None
    except RecursionError:  # re-encoding a document nested too deeply to check its CRC
        raise CorruptCheckpointError(f"{source}: nested too deeply", file=source) from None
