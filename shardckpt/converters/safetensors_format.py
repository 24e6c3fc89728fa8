"""The safetensors file format as pure functions: building a header, parsing one.

We write safetensors ourselves instead of calling ``safetensors.torch.save_file``
because the library needs every tensor in memory at once; with the header
computed up front from shapes and dtypes, the data can follow tensor by tensor
through a streaming writer. Byte layout (the library's, which we match)::

    u64 little-endian   N, the header's length in bytes
    N bytes             JSON object, padded with spaces so that N % 8 == 0:
                          "__metadata__": {str: str}          (optional)
                          name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}
    data                the tensors' raw little-endian bytes, C order, back to back;
                        offsets are relative to the end of the header

Tensors are laid out as the library lays them out: largest element size first,
then by name, so each tensor starts aligned to its element size.

``parse_header`` treats the file as hostile: the header's size is bounded, every
field is type-checked, and the tensors' byte ranges must tile the data region
exactly (no gaps, no overlaps, nothing past the end), as the library requires.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import CorruptCheckpointError

__all__ = [
    "ST_DTYPES",
    "MAX_HEADER_BYTES",
    "METADATA_KEY",
    "StTensor",
    "st_dtype_name",
    "layout_order",
    "build_header",
    "parse_header_length",
    "parse_header",
]

#: The safetensors library refuses headers larger than this.
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"

_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "C64": "complex64",
}  # fmt: skip
#: safetensors dtype name -> torch dtype, for the dtypes this torch has.
ST_DTYPES: dict[str, torch.dtype] = {
    st: getattr(torch, n) for st, n in _NAMES.items() if isinstance(getattr(torch, n, None), torch.dtype)
}
_ST_BY_DTYPE = {v: k for k, v in ST_DTYPES.items()}


def st_dtype_name(dtype: torch.dtype) -> str | None:
    """The safetensors name of ``dtype``, or None where the format has none
    (complex32, complex128, float8_e8m0fnu)."""
    return _ST_BY_DTYPE.get(dtype)


@dataclass(frozen=True)
class StTensor:
    """One tensor of a safetensors file: its data is ``[begin, end)`` after the header."""

    name: str
    dtype: str  # safetensors name
    shape: tuple[int, ...]
    begin: int
    end: int


def layout_order(tensors: Sequence[tuple[str, torch.dtype]]) -> list[int]:
    """Indices of ``(name, dtype)`` pairs in the order the library writes them."""
    return sorted(range(len(tensors)), key=lambda i: (-tensors[i][1].itemsize, tensors[i][0]))


def build_header(
    tensors: Sequence[tuple[str, torch.dtype, Sequence[int]]], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[StTensor]]:
    """The header bytes (length prefix included) of a file holding ``tensors``
    *in the given order*, and where each one's data goes.

    Raises ``ValueError`` for a dtype safetensors has no name for, a duplicate or
    reserved name, or a header over ``MAX_HEADER_BYTES``."""
    doc: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map str to str")
        doc[METADATA_KEY] = dict(metadata)
    placed, pos = [], 0
    for name, dtype, shape in tensors:
        st = st_dtype_name(dtype)
        if st is None:
            raise ValueError(f"tensor {name!r}: safetensors has no dtype for {dtype}")
        if name in doc:
            raise ValueError(f"tensor name {name!r} is duplicated or reserved in safetensors")
        end = pos + math.prod(shape) * dtype.itemsize
        doc[name] = {"dtype": st, "shape": [int(n) for n in shape], "data_offsets": [pos, end]}
        placed.append(StTensor(name, st, tuple(int(n) for n in shape), pos, end))
        pos = end
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    if len(text) > MAX_HEADER_BYTES:
        raise ValueError(f"safetensors header of {len(text)} bytes exceeds the format's {MAX_HEADER_BYTES}")
    return struct.pack("<Q", len(text)) + text, placed


def parse_header_length(prefix: bytes, file_size: int, where: str) -> int:
    """N from the first 8 bytes of a file of ``file_size`` bytes, bounds-checked."""
    if len(prefix) < 8 or file_size < 8:
        raise CorruptCheckpointError(f"{where}: {file_size} bytes is too short for a safetensors file", file=where)
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise CorruptCheckpointError(
            f"{where}: safetensors header length {n} is impossible for a file of {file_size} bytes", file=where)
    return n


def _bad(where: str, why: str, key: str | None = None) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{where}: not a valid safetensors file: {why}", file=where, key=key)


def parse_header(header: bytes, data_size: int, where: str) -> tuple[list[StTensor], dict[str, str]]:
    """Validate a header (its N bytes, without the length prefix) against a data
    region of ``data_size`` bytes; returns tensors in file order and the metadata.

    Unknown dtype names are kept (the caller decides what to do with them), but
    their byte ranges must still tile the data region."""
    try:
        doc = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(where, f"header is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise _bad(where, "header is not a JSON object")
    meta = doc.pop(METADATA_KEY, None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _bad(where, "__metadata__ must map strings to strings")
    tensors = []
    for name, d in doc.items():
        if not isinstance(d, dict):
            raise _bad(where, f"entry {name!r} is not an object", name)
        dtype, shape, offs = d.get("dtype"), d.get("shape"), d.get("data_offsets")
        if not isinstance(dtype, str):
            raise _bad(where, f"tensor {name!r} has no dtype", name)
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise _bad(where, f"tensor {name!r}: shape {shape!r} is not a list of sizes", name)
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise _bad(where, f"tensor {name!r}: data_offsets {offs!r} are not [begin, end]", name)
        known = ST_DTYPES.get(dtype)
        if known is not None and offs[1] - offs[0] != math.prod(shape) * known.itemsize:
            raise _bad(where, f"tensor {name!r}: {offs[1] - offs[0]} bytes for shape {shape} of {dtype}", name)
        tensors.append(StTensor(name, dtype, tuple(shape), offs[0], offs[1]))
    tensors.sort(key=lambda t: (t.begin, t.end))
    pos = 0
    for t in tensors:
        if t.begin != pos:
            raise _bad(where, f"tensor {t.name!r} starts at {t.begin}, expected {pos} (gap or overlap)", t.name)
        pos = t.end
    if pos != data_size:
        raise _bad(where, f"tensors cover {pos} bytes of a {data_size}-byte data region")
    return tensors, dict(meta)
