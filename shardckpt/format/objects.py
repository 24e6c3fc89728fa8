"""How non-tensor values are stored: JSON when it is exact (``jsoncodec``: NaN and
infinities included, in its JSON-safe form), raw bytes for bytes,
an ``io.BytesIO``'s own bytes for a BytesIO, else torch's weights-only format.
Every choice loads without running code.

``bytesio`` payload layout (little-endian)::

    offset 0   u64   the stream position (``tell()``) at save time
    offset 8   ...   the buffer's bytes (``getvalue()``), raw
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from typing import Any

import torch

from ..errors import CheckpointWriteError
from . import jsoncodec

__all__ = [
    "resolve_object", "encode_object", "decode_object", "weights_only_reason", "raw_bytesio", "INLINE_LIMIT",
]

#: JSON values up to this size live inline in the manifest; larger ones in a shard.
INLINE_LIMIT = 16 << 10
#: Header of a ``bytesio`` payload: the stream position.
_BYTESIO_POS = struct.Struct("<Q")


class _RawBytesIO(io.BytesIO):
    """A BytesIO value's stored payload (position header + its bytes), taken at
    resolve time: a snapshot, so the caller may keep writing to its buffer."""


def raw_bytesio(value: io.BytesIO) -> io.BytesIO:
    """The ``bytesio`` payload of ``value``, in a form ``encode_object`` recognises."""
    return _RawBytesIO(_BYTESIO_POS.pack(value.tell()) + value.getvalue())


def resolve_object(resolve: Callable[[Any], Any], item: Any) -> io.BytesIO:
    """DCP's ``resolve_data`` for a non-tensor item (it ``torch.save``s the value),
    with a failure naming the key: a lambda or a lock fails right here.

    An ``io.BytesIO`` value (DCP pickles it) is taken raw instead, when ``resolve``
    is a planner's ``resolve_data`` whose ``lookup_object`` finds it."""
    lookup = getattr(getattr(resolve, "__self__", None), "lookup_object", None)
    try:
        if lookup is not None:
            value = lookup(item.index)
            if type(value) is io.BytesIO:
                return raw_bytesio(value)
        return resolve(item)
    except Exception as e:  # noqa: BLE001 - reported with the key at fault
        key = item.index.fqn
        raise CheckpointWriteError(
            f"value at key {key!r} cannot be saved: {type(e).__name__}: {e}", key=key
        ) from e


def encode_object(key: str, pickled: io.BytesIO) -> tuple[str, bytes, Any]:
    """Given DCP's ``torch.save`` bytes of a value, return ``(encoding, payload, value)``.

    The value is reloaded with ``weights_only=True`` here, at save time, so a value
    that could only be restored by running pickled code fails now, not at resume.
    A ``raw_bytesio`` payload is stored as it is, encoding ``"bytesio"``.
    """
    if isinstance(pickled, _RawBytesIO):
        payload = pickled.getvalue()
        return "bytesio", payload, decode_object("bytesio", payload)
    raw = pickled.getvalue()
    try:
        value = torch.load(io.BytesIO(raw), weights_only=True)
    except Exception as e:  # noqa: BLE001 - reported with the key at fault
        raise CheckpointWriteError(
            f"value at key {key!r} cannot be saved safely: loading it would need to run pickled "
            f"code ({weights_only_reason(e)}). Store tensors, "
            "JSON-like values (int/float/str/bool/None and lists/dicts of them), bytes, io.BytesIO, "
            "or convert it.",
            key=key,
        ) from None
    if isinstance(value, (bytes, bytearray)):
        return "bytes", bytes(value), value
    if jsoncodec.is_exact(value):  # non-finite floats included (the codec's NaN rule)
        return "json", jsoncodec.encode(value, canonical=False, where=f"key {key!r}"), value
    return "torch", raw, value


def weights_only_reason(e: Exception) -> str:
    """The line of torch's weights-only error that names what was refused.

    (Its first line advises weights_only=False, which is wrong advice here.)"""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    hit = next((ln for ln in lines if "unsupported" in ln.lower() or "global" in ln.lower()), None)
    return hit or (lines[0] if lines else type(e).__name__)


def decode_object(encoding: str, payload: bytes) -> Any:
    """Inverse of ``encode_object``; never unpickles with code execution."""
    if encoding == "bytesio":
        if len(payload) < _BYTESIO_POS.size:
            raise ValueError(f"bytesio payload of {len(payload)} bytes has no {_BYTESIO_POS.size}-byte header")
        (pos,) = _BYTESIO_POS.unpack_from(payload)
        if pos > 1 << 62:
            raise ValueError(f"bytesio position {pos} is out of range")
        out = io.BytesIO(payload[_BYTESIO_POS.size:])
        out.seek(pos)
        return out
    if encoding == "bytes":
        return payload
    if encoding == "json":
        return jsoncodec.decode(payload)
    if encoding == "torch":
        return torch.load(io.BytesIO(payload), weights_only=True)
    raise ValueError(f"unknown object encoding {encoding!r}")
