"""Validation of decoded manifest and index documents: every field's type and
range, paths that stay inside the checkpoint, chunk lists whose sizes add up.
Everything raises ``Bad`` with the place at fault; the decoders turn it into
``CorruptCheckpointError`` naming the file."""

from __future__ import annotations

import math
import posixpath
from collections.abc import Mapping
from typing import Any

from . import codec as _codec
from .entries import BlobRef, ChunkInfo

__all__ = ["Bad", "req", "nonneg_int", "finite_float", "int_list", "validate_relpath", "blob",
           "blob_at", "DATA_DIR", "CODECS"]

DATA_DIR = "data"
#: Chunk codecs this version can decode.
CODECS = frozenset(_codec.CODECS)
_MAX_NAME, _MAX_PATH = 255, 1024


class Bad(Exception):
    """A field of a manifest or index that is wrong (message: where and why)."""


def req(d: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise Bad(f"{where}: missing field {key!r}")
    v = d[key]
    # bool is an int subclass; never accept it where a number is meant.
    if not isinstance(v, typ) or (isinstance(v, bool) and bool not in _as_tuple(typ)):
        raise Bad(f"{where}.{key}: expected {_tname(typ)}, got {type(v).__name__}")
    return v


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def _tname(t: type | tuple[type, ...]) -> str:
    return "/".join(x.__name__ for x in _as_tuple(t))


def nonneg_int(v: Any, where: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise Bad(f"{where}: expected a non-negative integer, got {v!r}")
    return v


def finite_float(v: int | float, where: str) -> float:
    """``v`` as a finite float (JSON's safe form can carry NaN and infinities: not here)."""
    try:
        f = float(v)
    except OverflowError:
        raise Bad(f"{where}: {v} is out of range") from None
    if not math.isfinite(f):
        raise Bad(f"{where}: {f} is not a finite number")
    return f


def int_list(v: Any, where: str) -> tuple[int, ...]:
    if not isinstance(v, list):
        raise Bad(f"{where}: expected a list of integers")
    return tuple(nonneg_int(x, f"{where}[{i}]") for i, x in enumerate(v))


def validate_relpath(path: Any) -> str:
    """A path inside the checkpoint: relative, normalized, under ``data/``, no ``..``."""
    if not isinstance(path, str) or not path:
        raise Bad(f"file path {path!r} is not a non-empty string")
    if path.startswith("/") or "\\" in path or ":" in path or "\x00" in path:
        raise Bad(f"file path {path!r} is absolute or not a plain relative path")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or posixpath.normpath(path) != path:
        raise Bad(f"file path {path!r} escapes or is not normalized within the checkpoint")
    if parts[0] != DATA_DIR or len(parts) < 2:
        raise Bad(f"file path {path!r} is not under {DATA_DIR}/")
    # Longer names than any filesystem (255 bytes a name) or object store (1024 a key)
    # takes would fail in the backend with an untyped OS error.
    if len(path.encode("utf-8", "surrogatepass")) > _MAX_PATH or any(
        len(p.encode("utf-8", "surrogatepass")) > _MAX_NAME for p in parts
    ):
        raise Bad(f"file path {path[:80]!r}... is longer than {_MAX_NAME} bytes a name or {_MAX_PATH} in all")
    return path


def blob(d: dict[str, Any], files: Mapping[str, int], where: str, max_chunk: int, raw_only: bool = False) -> BlobRef:
    """A manifest's ``{"file", "offset", "chunks": [[codec, raw_len, stored_len, crc32c], ...]}``."""
    file = validate_relpath(req(d, "file", str, where))
    offset = nonneg_int(req(d, "offset", int, where), f"{where}.offset")
    return blob_at(file, offset, req(d, "chunks", list, where), files, where, max_chunk, raw_only)


def blob_at(file: str, offset: int, chunk_docs: list[Any], files: Mapping[str, int], where: str,
            max_chunk: int, raw_only: bool = False, compact: bool = False) -> BlobRef:
    """The chunks of a blob at ``file``/``offset``, checked. ``compact`` (index files):
    a raw chunk may be written ``[raw_len, crc32c]``, any other ``[codec, raw_len, stored_len, crc32c]``."""
    if file not in files:
        raise Bad(f"{where}: file {file!r} is not listed in the manifest's files")
    if not isinstance(chunk_docs, list):
        raise Bad(f"{where}.chunks: expected a list")
    chunks = []
    for i, c in enumerate(chunk_docs):
        cw = f"{where}.chunks[{i}]"
        if compact and isinstance(c, list) and len(c) == 2:
            c = ["raw", c[0], c[0], c[1]]
        elif compact and isinstance(c, list) and c and c[0] == "raw":
            raise Bad(f"{cw}: a raw chunk in an index is written [raw_len, crc32c]")
        if not isinstance(c, list) or len(c) != 4 or not isinstance(c[0], str):
            raise Bad(f"{cw}: expected [codec, raw_len, stored_len, crc32c]")
        if c[0] not in CODECS:
            raise Bad(f"{cw}: unknown codec {c[0]!r} (written by a newer shardckpt?)")
        raw, stored, crc = (nonneg_int(x, cw) for x in c[1:])
        if crc > 0xFFFFFFFF:
            raise Bad(f"{cw}: crc32c {crc} out of range")
        if c[0] == "raw" and raw != stored:
            raise Bad(f"{cw}: raw chunk with raw_len {raw} != stored_len {stored}")
        if raw_only and c[0] != "raw":
            raise Bad(f"{cw}: object blobs are stored raw, found codec {c[0]!r}")
        # Bounds what decoding may allocate, whatever a crafted manifest claims.
        if raw > max_chunk:
            raise Bad(f"{cw}: raw_len {raw} exceeds the checkpoint's chunk size {max_chunk}")
        chunks.append(ChunkInfo(c[0], raw, stored, crc))
    out = BlobRef(file, offset, tuple(chunks))
    if offset + out.stored_len > files[file]:
        raise Bad(f"{where}: bytes [{offset}, {offset + out.stored_len}) exceed {file}'s size {files[file]}")
    return out
