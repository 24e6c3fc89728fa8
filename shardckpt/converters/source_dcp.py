"""Reading a torch.distributed.checkpoint (DCP) directory without trusting it.

DCP's ``.metadata`` is a pickle, and DCP loads it with a plain ``pickle.load``:
a crafted one runs code. We read it with ``MetadataUnpickler``, which resolves
only the globals a real DCP ``.metadata`` references. Found by saving DCP
checkpoints with torch 2.13 (plain tensors, 2-rank ``Shard(0)``/``Replicate``
DTensors, nested dicts and lists, non-tensor values) and listing every global the
pickle resolves (``pickletools`` shows them as ``STACK_GLOBAL``)::

    torch.distributed.checkpoint.metadata  Metadata, TensorStorageMetadata,
        BytesStorageMetadata, ChunkStorageMetadata, TensorProperties,
        MetadataIndex, StorageMeta, _MEM_FORMAT_ENCODING
    torch.distributed.checkpoint.filesystem  _StorageInfo
    torch  Size, and dtypes (float32, bfloat16, ...)
    torch.serialization  _get_layout  (called with "torch.strided")
    pathlib  PosixPath  (StorageMeta.checkpoint_id)

Every other global is refused before anything is called (``UnsupportedFormatError``
naming it). ``_get_layout`` and the path classes are replaced by stand-ins that
only look a name up or build a pure path. What it yields is then checked field by
field (types, bounds, file names staying inside the directory).

Tensor data: DCP's ``FileSystemWriter`` (``filesystem._write_item``) writes each
tensor item as its own ``torch.save`` blob at ``_StorageInfo(relative_path,
offset, length)`` of a ``__<rank>_<n>.distcp`` file, and non-tensor (BYTE_IO)
items as the ``torch.save`` bytes of the value. Both are read here through ranged
reads with ``torch.load(weights_only=True)``, one item at a time.
"""

from __future__ import annotations

import functools
import io
import math
import pickle
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch.distributed.checkpoint import metadata as dcp_md

from ..backends import Storage
from ..compat import DcpStorageInfo
from ..errors import CorruptCheckpointError, UnsupportedFormatError
from ..format.layout import DTYPES
from ..io.shard_reader import OpenFiles
from .items import (
    Buffers,
    Dropped,
    Item,
    ObjectItem,
    Step,
    TensorItem,
    box_slices,
    c_order,
    check_tiling,
    flat_pieces,
    run_jobs,
)
from .source_files import RangeFile, load_pickled

__all__ = ["DcpSource", "MetadataUnpickler", "read_dcp_metadata", "DCP_METADATA"]

DCP_METADATA = ".metadata"
#: What torch.serialization._get_layout looks names up in: torch's layout objects.
_LAYOUTS = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
_MD_CLASSES = ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
               "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")


def _get_layout(name: str) -> torch.layout:
    try:
        return _LAYOUTS[name]
    except (KeyError, TypeError):
        raise pickle.UnpicklingError(f"unknown layout {name!r}") from None


_ALLOWED: dict[tuple[str, str], Any] = {
    **{("torch.distributed.checkpoint.metadata", n): getattr(dcp_md, n) for n in _MD_CLASSES},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): DcpStorageInfo,
    ("torch", "Size"): torch.Size,
    **{("torch", n): d for n, d in DTYPES.items()},
    ("torch.serialization", "_get_layout"): _get_layout,
    ("pathlib", "PosixPath"): PurePosixPath,
    ("pathlib", "PurePosixPath"): PurePosixPath,
    ("pathlib", "WindowsPath"): PureWindowsPath,
    ("pathlib", "PureWindowsPath"): PureWindowsPath,
    ("collections", "OrderedDict"): dict,
}


class MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals of DCP's metadata schema (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of DCP metadata")


class _Refused(pickle.UnpicklingError):
    pass


@dataclass(frozen=True)
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int


def _valid_name(rel: Any, where: str) -> str:
    if (not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or ":" in rel or "\x00" in rel
            or any(p in ("", ".", "..") for p in rel.split("/")) or posixpath.normpath(rel) != rel):
        raise CorruptCheckpointError(f"{where}: data file name {rel!r} escapes the checkpoint", file=where)
    return rel


def _ints(v: Any, n: int | None, what: str, where: str, key: str) -> tuple[int, ...]:
    if not isinstance(v, (torch.Size, tuple, list)) or not all(type(x) is int and x >= 0 for x in v) or (
            n is not None and len(v) != n):
        raise CorruptCheckpointError(f"{where}: key {key!r}: {what} {v!r} is not a list of {n} sizes", key=key)
    return tuple(v)


def read_dcp_metadata(data: bytes, where: str) -> dcp_md.Metadata:
    """Unpickle ``.metadata`` with ``MetadataUnpickler``; typed errors otherwise."""
    try:
        md = MetadataUnpickler(io.BytesIO(data)).load()
    except _Refused as e:
        raise UnsupportedFormatError(
            f"{where}: refusing to unpickle global {e}: a DCP .metadata holds only DCP's metadata classes, "
            "torch.Size, dtypes and plain containers; anything else means a newer DCP format or a hostile "
            "file. Nothing from it was run.", path=where, refused_global=str(e)) from None
    except Exception as e:  # noqa: BLE001 - any failure of a restricted unpickle is a damaged file
        raise CorruptCheckpointError(f"{where}: not a readable DCP .metadata ({type(e).__name__}: {e})",
                                     file=where) from None
    if type(md) is not dcp_md.Metadata or not isinstance(md.state_dict_metadata, dict):
        raise CorruptCheckpointError(f"{where}: does not hold a DCP Metadata object", file=where)
    return md


class DcpSource:
    """A DCP checkpoint directory written by ``FileSystemWriter`` (torch.save items)."""

    format = "dcp"

    def __init__(self, storage: Storage, trust_pickle: bool = False) -> None:
        self.storage, self.url, self._trust = storage, storage.url, trust_pickle
        self.dropped: list[Dropped] = []
        self.metadata: dict[str, Any] = {}
        self._files = OpenFiles(self.storage, self.url, "data file")
        where = f"{self.url.rstrip('/')}/{DCP_METADATA}"
        md = read_dcp_metadata(storage.read_bytes(DCP_METADATA), where)
        storage_data = md.storage_data if isinstance(md.storage_data, dict) else {}
        paths = md.planner_data if isinstance(md.planner_data, dict) else {}
        infos: dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int]] = {}
        for idx, info in storage_data.items():
            if type(idx) is not dcp_md.MetadataIndex or type(info) is not DcpStorageInfo:
                raise CorruptCheckpointError(f"{where}: storage_data holds {type(idx).__name__} -> "
                                             f"{type(info).__name__}, not MetadataIndex -> _StorageInfo", file=where)
            fqn = idx.__dict__.get("fqn")
            if not isinstance(fqn, str):
                raise CorruptCheckpointError(f"{where}: storage_data key without a name", file=where)
            descriptors = getattr(info, "transform_descriptors", None)
            if descriptors:
                raise UnsupportedFormatError(
                    f"{where}: key {fqn!r} is stored with DCP extensions {list(descriptors)} "
                    "(e.g. compression), which convert does not read", path=where)
            off = idx.__dict__.get("offset")
            at = None if off is None else _ints(off, None, "offset", where, fqn)
            rel = _valid_name(info.__dict__.get("relative_path"), where)
            o, n = info.__dict__.get("offset"), info.__dict__.get("length")
            if type(o) is not int or type(n) is not int or o < 0 or n < 0:
                raise CorruptCheckpointError(f"{where}: key {fqn!r}: bad byte range {o!r}+{n!r}", key=fqn)
            infos[(fqn, at)] = (rel, o, n)
        self._tensors: dict[str, list[_Chunk]] = {}
        self._objects: dict[str, tuple[str, int, int]] = {}
        self._items: list[Item] = []
        for fqn, smd in md.state_dict_metadata.items():
            if not isinstance(fqn, str):
                raise CorruptCheckpointError(f"{where}: a key is not a string: {fqn!r}", file=where)
            kp = paths.get(fqn, (fqn,))
            if not isinstance(kp, (tuple, list)) or not kp or not all(
                    isinstance(p, (str, int)) and not isinstance(p, bool) for p in kp):
                kp = (fqn,)
            if type(smd) is dcp_md.BytesStorageMetadata:
                if (fqn, None) not in infos:
                    raise CorruptCheckpointError(f"{where}: no stored bytes for key {fqn!r}", key=fqn)
                self._objects[fqn] = infos[(fqn, None)]
                self._items.append(ObjectItem(fqn, tuple(kp)))
                continue
            if type(smd) is not dcp_md.TensorStorageMetadata or type(smd.properties) is not dcp_md.TensorProperties:
                raise CorruptCheckpointError(f"{where}: key {fqn!r} has metadata of type {type(smd).__name__}",
                                             key=fqn)
            dtype = smd.properties.__dict__.get("dtype")
            if not isinstance(dtype, torch.dtype) or dtype not in DTYPES.values():
                self.dropped.append(Dropped(fqn, f"dtype {dtype} is not supported"))
                continue
            shape = _ints(smd.size, None, "size", where, fqn)
            chunks = []
            for ch in smd.chunks if isinstance(smd.chunks, list) else ():
                if type(ch) is not dcp_md.ChunkStorageMetadata:
                    raise CorruptCheckpointError(f"{where}: key {fqn!r}: chunk of type {type(ch).__name__}", key=fqn)
                offs = _ints(ch.offsets, len(shape), "chunk offsets", where, fqn)
                sizes = _ints(ch.sizes, len(shape), "chunk sizes", where, fqn)
                if (fqn, offs) not in infos:
                    raise CorruptCheckpointError(f"{where}: key {fqn!r}: no stored bytes for the chunk at "
                                                 f"{list(offs)}", key=fqn)
                chunks.append(_Chunk(offs, sizes, *infos[(fqn, offs)]))
            check_tiling(fqn, shape, [(c.offsets, c.sizes) for c in chunks], where)
            self._tensors[fqn] = chunks
            self._items.append(TensorItem(fqn, tuple(kp), dtype, shape))

    def items(self) -> list[Item]:
        return list(self._items)

    def _load_item(self, rel: str, offset: int, length: int, key: str, trust: bool) -> Any:
        where = f"{self.url.rstrip('/')}/{rel}[{offset}:{offset + length}] (key {key!r})"
        r = self._files.get(rel)
        if offset + length > r.size():
            raise CorruptCheckpointError(f"{where}: past the end of a {r.size()}-byte file", file=rel, key=key)
        magic = bytearray(min(4, length))
        r.read_into(offset, memoryview(magic))
        if magic != b"PK\x03\x04":  # FileSystemWriter's default: every item is a torch.save zip
            raise UnsupportedFormatError(
                f"{where}: not a torch.save item (a DCP checkpoint written with another serialization "
                "format, e.g. SerializationFormat.SAFETENSORS, is not supported)", path=where)
        return load_pickled(RangeFile(r, offset, length, where), where, trust)

    def _chunk(self, item: TensorItem, c: _Chunk) -> torch.Tensor:
        t = self._load_item(c.file, c.offset, c.length, item.key, False)  # tensors: weights_only always
        if not isinstance(t, torch.Tensor) or t.dtype != item.dtype or tuple(t.shape) != c.sizes:
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise CorruptCheckpointError(
                f"{self.url}/{c.file}: key {item.key!r}: chunk at {list(c.offsets)} holds {got}, metadata "
                f"says {item.dtype} {list(c.sizes)}", file=c.file, key=item.key)
        return t

    def stream(self, items: Sequence[TensorItem], out_dtypes: Sequence[torch.dtype],
               max_bytes: int) -> Iterator[tuple[TensorItem, torch.Tensor]]:
        def one(item: TensorItem, c: _Chunk, bufs: Buffers) -> list[torch.Tensor]:
            return flat_pieces(self._chunk(item, c).contiguous(), max_bytes)

        def whole(item: TensorItem, bufs: Buffers) -> list[torch.Tensor]:
            out = torch.empty(item.shape, dtype=item.dtype)
            for c in self._tensors[item.key]:
                if math.prod(c.sizes):
                    out[box_slices(c.offsets, c.sizes)].copy_(self._chunk(item, c))
            return flat_pieces(out, max_bytes)

        def steps() -> Iterator[Step]:
            for item, od in zip(items, out_dtypes):
                chunks = self._tensors[item.key]
                order = c_order(item.shape, [(c.offsets, c.sizes) for c in chunks])
                if order is None:  # the tensor and one loaded chunk at a time
                    yield Step(item, functools.partial(whole, item), od, 2 * item.nbytes)
                else:
                    for i in order:
                        held = math.prod(chunks[i].sizes) * item.dtype.itemsize
                        yield Step(item, functools.partial(one, item, chunks[i]), od, held)

        return run_jobs(steps(), max_bytes)

    def read_object(self, item: ObjectItem) -> Any:
        rel, offset, length = self._objects[item.key]
        return self._load_item(rel, offset, length, item.key, self._trust)

    def close(self) -> None:
        self._files.close()
