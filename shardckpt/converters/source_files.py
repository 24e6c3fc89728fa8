"""Reading single-file formats for conversion: safetensors (one file or a Hugging
Face directory) and ``torch.save`` files.

safetensors is parsed here (``safetensors_format.parse_header``, hostile-input
checks included) and its tensors read by ranged reads through the storage
backend, piece by piece: that works on every backend (``s3://`` included), never
needs a whole tensor in memory, and holds no memory map whose touched pages stay
resident. ``torch.save`` files are opened with ``torch.load(weights_only=True,
mmap=True)`` on local paths (tensors are views of the mapped file, read as they
are written out); elsewhere, or for the legacy non-zip format, without mmap,
which reads the whole file into memory.

Nothing here unpickles with code execution unless the caller passed
``trust_pickle=True``, an explicit opt-in for a file the user made.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import pickle
import posixpath
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..backends import RandomReader, Storage
from ..compat import flatten_state_dict
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedFormatError
from ..format.layout import DTYPES
from ..format.objects import weights_only_reason
from .items import (
    Buffers,
    Dropped,
    Item,
    ObjectItem,
    Step,
    TensorItem,
    cast,
    flat_pieces,
    piece_bytes,
    run_jobs,
)
from .safetensors_format import ST_DTYPES, parse_header, parse_header_length

__all__ = ["SafetensorsSource", "TorchSource", "RangeFile", "load_pickled", "read_hf_index", "HF_INDEX", "HF_SINGLE"]

log = logging.getLogger("shardckpt.convert")
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")
_SUPPORTED = set(DTYPES.values())


class RangeFile(io.RawIOBase):
    """A read-only, seekable file over bytes ``[start, start + length)`` of a
    backend reader, so ``torch.load`` can read one item of a larger file through
    ranged reads (any backend) instead of a local path."""

    def __init__(self, reader: RandomReader, start: int, length: int, name: str) -> None:
        super().__init__()
        self._r, self._start, self._len, self._pos, self.name = reader, start, length, 0, name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = max(0, min(view.nbytes, self._len - self._pos))
        if n:
            try:
                self._r.read_into(self._start + self._pos, view[:n])
            except EOFError as e:
                raise CorruptCheckpointError(f"{self.name}: truncated ({e})", file=self.name) from None
            self._pos += n
        return n


def load_pickled(f: Any, where: str, trust_pickle: bool, mmap: bool = False) -> Any:
    """``torch.load`` of a path or file object with ``weights_only=True``; a refusal
    becomes ``UnsupportedFormatError`` naming the refused global. ``trust_pickle``
    loads with ``weights_only=False`` after a loud warning."""
    if trust_pickle:
        msg = (f"trust_pickle=True: unpickling {where} with weights_only=False. This runs whatever code "
               "the file carries; do it only for a file you created yourself.")
        warnings.warn(msg, UserWarning, stacklevel=3)
        log.warning("%s", msg)
        return torch.load(f, map_location="cpu", weights_only=False, mmap=mmap)
    try:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        why = weights_only_reason(e)
        m = _GLOBAL.search(why)
        raise UnsupportedFormatError(
            f"{where}: refusing to unpickle it: torch.load(weights_only=True) refused it ({why}). Loading it "
            "would run code from the file. If you created this file yourself (a legacy training checkpoint "
            "that pickles whole objects), pass trust_pickle=True (CLI: --trust-pickle) to load it with "
            "weights_only=False; never do that for a file from elsewhere.",
            path=where, refused_global=m.group(1) if m else None) from None
    except Exception as e:  # noqa: BLE001 - zip/pickle errors of a damaged file, typed with the file
        raise CorruptCheckpointError(
            f"{where}: cannot be read as a torch.save file: {type(e).__name__}: {e}", file=where) from None


class TorchSource:
    """A ``torch.save`` file holding a (nested) dict; keys are flattened as DCP does."""

    format = "torch"

    def __init__(self, storage: Storage, rel: str, local_path: str | None, trust_pickle: bool) -> None:
        self.url = f"{storage.url.rstrip('/')}/{rel}"
        self.dropped: list[Dropped] = []
        self.metadata: dict[str, Any] = {}
        self._reader: RandomReader | None = None
        try:
            self._reader = storage.open_reader(rel)
        except (FileNotFoundError, IsADirectoryError):
            raise CheckpointNotFoundError(f"no file at {self.url}", path=self.url) from None
        size = self._reader.size()
        magic = bytearray(min(4, size))
        self._reader.read_into(0, memoryview(magic))
        if local_path is not None and magic == b"PK\x03\x04":
            # zip format on a local path: tensors map the file instead of being read in
            obj = load_pickled(local_path, self.url, trust_pickle, mmap=True)
        else:  # legacy format, or another backend: read through ranged reads, all in memory
            obj = load_pickled(RangeFile(self._reader, 0, size, self.url), self.url, trust_pickle)
        if not isinstance(obj, dict) and trust_pickle and callable(getattr(obj, "state_dict", None)):
            obj = obj.state_dict()  # a whole pickled nn.Module; only reachable with trust_pickle
        if not isinstance(obj, dict):
            raise UnsupportedFormatError(
                f"{self.url} holds a {type(obj).__name__}, not a dict of tensors", path=self.url)
        try:
            flat, paths = flatten_state_dict(obj)
        except ValueError as e:
            raise UnsupportedFormatError(f"{self.url}: {e}", path=self.url) from None
        self._values: dict[str, Any] = flat
        self._items: list[Item] = []
        for key, v in flat.items():
            path = tuple(paths[key])
            if isinstance(v, torch.Tensor):
                plain = type(v) in (torch.Tensor, torch.nn.Parameter)
                if not plain or v.layout != torch.strided or v.dtype not in _SUPPORTED:
                    self.dropped.append(Dropped(key, f"{type(v).__name__} with layout {v.layout} and dtype "
                                                     f"{v.dtype} is not a plain dense tensor shardckpt stores"))
                    continue
                self._items.append(TensorItem(key, path, v.dtype, tuple(v.shape)))
            else:
                self._items.append(ObjectItem(key, path))

    def items(self) -> list[Item]:
        return list(self._items)

    def stream(self, items: Sequence[TensorItem], out_dtypes: Sequence[torch.dtype],
               max_bytes: int) -> Iterator[tuple[TensorItem, torch.Tensor]]:
        def job(t: torch.Tensor, bufs: Buffers) -> list[torch.Tensor]:
            # views of the mapped file; a non-contiguous tensor is copied, one at a time
            return flat_pieces(t.contiguous(), max_bytes)

        steps = []
        for it, od in zip(items, out_dtypes):
            t = self._values[it.key]
            steps.append(Step(it, functools.partial(job, t), od, 0 if t.is_contiguous() else it.nbytes))
        return run_jobs(steps, max_bytes)

    def read_object(self, item: ObjectItem) -> Any:
        return self._values[item.key]

    def close(self) -> None:
        self._values = {}
        if self._reader is not None:
            self._reader.close()


class SafetensorsSource:
    """One ``.safetensors`` file, or a Hugging Face directory (``model.safetensors``
    or ``model.safetensors.index.json`` with its shard files)."""

    def __init__(self, storage: Storage, files: Sequence[str], index: dict[str, Any] | None = None,
                 fmt: str = "safetensors") -> None:
        self.format = fmt
        self.storage = storage
        self.url = storage.url
        self.dropped: list[Dropped] = []
        self.metadata: dict[str, Any] = {}
        self._readers: dict[str, RandomReader] = {}
        self._where: dict[str, tuple[str, int, int]] = {}  # name -> (file, start, nbytes)
        self._items: list[Item] = []
        meta: dict[str, str] = {}
        for rel in files:
            meta.update(self._scan(rel))
        if meta:
            self.metadata["safetensors_metadata"] = meta
        if index is not None:
            self._check_index(index)

    def _scan(self, rel: str) -> dict[str, str]:
        where = f"{self.url.rstrip('/')}/{rel}"
        try:
            r = self._readers[rel] = self.storage.open_reader(rel)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{where}: safetensors file is missing", file=where) from None
        size = r.size()
        prefix = bytearray(min(8, size))
        r.read_into(0, memoryview(prefix))
        n = parse_header_length(bytes(prefix), size, where)
        header = bytearray(n)
        r.read_into(8, memoryview(header))
        tensors, meta = parse_header(bytes(header), size - 8 - n, where)
        for t in tensors:
            if t.name in self._where:
                raise CorruptCheckpointError(f"{where}: tensor {t.name!r} also appears in "
                                             f"{self._where[t.name][0]}", file=where, key=t.name)
            dtype = ST_DTYPES.get(t.dtype)
            if dtype is None or dtype not in _SUPPORTED:
                self.dropped.append(Dropped(t.name, f"safetensors dtype {t.dtype} is not supported"))
                continue
            self._where[t.name] = (rel, 8 + n + t.begin, t.end - t.begin)
            self._items.append(TensorItem(t.name, (t.name,), dtype, t.shape))
        return meta

    def _check_index(self, index: dict[str, Any]) -> None:
        dropped = {d.key for d in self.dropped}
        for name, rel in index["weight_map"].items():
            if name not in dropped and self._where.get(name, (None,))[0] != rel:
                raise CorruptCheckpointError(
                    f"{self.url}/{HF_INDEX}: tensor {name!r} is listed in {rel} but not found there",
                    file=HF_INDEX, key=name)
        if isinstance(index.get("metadata"), dict):
            self.metadata["hf_index_metadata"] = index["metadata"]

    def items(self) -> list[Item]:
        return list(self._items)

    def stream(self, items: Sequence[TensorItem], out_dtypes: Sequence[torch.dtype],
               max_bytes: int) -> Iterator[tuple[TensorItem, torch.Tensor]]:
        def read(item: TensorItem, rel: str, start: int, n: int, od: torch.dtype, bufs: Buffers) -> list[torch.Tensor]:
            buf = bufs.alloc(n)
            try:
                self._readers[rel].read_into(start, memoryview(buf.numpy()))  # type: ignore[arg-type]
            except EOFError as e:
                raise CorruptCheckpointError(f"{self.url}/{rel}: truncated in tensor {item.key!r}: {e}",
                                             file=rel, key=item.key) from None
            return [cast(buf.view(item.dtype), od)]

        def steps() -> Iterator[Step]:
            for item, od in zip(items, out_dtypes):
                rel, start, nbytes = self._where[item.key]
                step = piece_bytes(max_bytes, item.dtype.itemsize)
                for lo in range(0, nbytes, step):
                    n = min(step, nbytes - lo)
                    yield Step(item, functools.partial(read, item, rel, start + lo, n, od), od)

        return run_jobs(steps(), max_bytes)

    def read_object(self, item: ObjectItem) -> Any:
        raise KeyError(item.key)  # safetensors files hold tensors only

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()


def read_hf_index(storage: Storage) -> tuple[list[str], dict[str, Any]]:
    """Shard files named by a Hugging Face index, validated (relative, no ``..``)."""
    where = f"{storage.url.rstrip('/')}/{HF_INDEX}"
    try:
        index = json.loads(storage.read_bytes(HF_INDEX))
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{where}: not valid JSON ({e})", file=where) from None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise CorruptCheckpointError(f"{where}: no weight_map of tensor name -> file name", file=where)
    files = list(dict.fromkeys(wm.values()))
    for rel in files:
        if (not rel or rel.startswith("/") or "\\" in rel or ":" in rel or "\x00" in rel
                or any(p in ("", ".", "..") for p in rel.split("/")) or posixpath.normpath(rel) != rel):
            raise CorruptCheckpointError(f"{where}: file name {rel!r} escapes the directory", file=where)
    return files, index
