"""``convert``: from one checkpoint format to another, streaming.

Call order (one process; nothing here is collective):

1. Resolve the target (``to=``, else the destination's suffix) and check every
   argument, before anything is opened.
2. Open the source: detect its format, read and validate its index (manifest,
   DCP ``.metadata`` through a restricted unpickler, safetensors headers, or the
   weights-only unpickle of a ``torch.save`` file). No tensor data is read yet.
3. Plan: select keys (``only=``), rename, pick output dtypes. The target then
   lays out its files (safetensors: every header offset) from the plan alone.
4. Stream: per tensor, bounded pieces in C order, read one ahead on a
   background thread, written through the backend's streaming writer.
5. Publish: files appear whole (tmp + rename, or a completed upload); a
   shardckpt target's manifest, an HF index and a DCP ``.metadata`` come last.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import knobs
from ..backends import check_storage_options, open_storage
from ..errors import CheckpointNotFoundError, UnsupportedFormatError
from ..format.codec import Compression
from ..format.codec import resolve as resolve_compression
from ..format.manifest import DATA_DIR, MANIFEST_NAME
from .items import ByteProgress, Dropped, Source
from .output import Written, require_absent, require_empty_dir
from .selection import make_plan, parse_dtype, parse_size
from .source_dcp import DCP_METADATA, DcpSource
from .source_files import HF_INDEX, HF_SINGLE, SafetensorsSource, TorchSource, read_hf_index
from .source_shardckpt import ShardckptSource
from .target_shardckpt import write_shardckpt
from .targets import write_dcp, write_hf_dir, write_safetensors, write_torch

__all__ = ["convert", "ConvertReport", "open_source", "TARGETS"]

log = logging.getLogger("shardckpt.convert")
#: Formats ``to=`` accepts.
TARGETS = ("shardckpt", "safetensors", "torch", "dcp")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class ConvertReport:
    """What ``convert`` did. ``keys`` are the output names written (tensors and
    values); ``dropped`` every source key that is not in the output, with why;
    ``files`` the published files; ``bytes_written`` their total size."""

    src: str
    dst: str
    src_format: str
    dst_format: str
    keys: tuple[str, ...]
    bytes_written: int
    dropped: tuple[Dropped, ...]
    files: tuple[str, ...]
    seconds: float


def _split(url: str) -> tuple[str, str]:
    """(parent, name) of a file path or URL."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        parent, _, name = rest.rstrip("/").rpartition("/")
        return f"{scheme}://{parent}", name
    path = os.path.abspath(url)
    return os.path.dirname(path), os.path.basename(path)


def _local_path(url: str) -> str | None:
    if "://" not in url:
        return os.path.abspath(url)
    return url[len("file://"):] if url.startswith("file://") else None


def open_source(src: PathLike, storage_options: Mapping[str, Any] | None = None,
                trust_pickle: bool = False) -> Source:
    """The source at ``src``, its format detected (see ``convert``)."""
    url = os.fspath(src)
    storage = open_storage(url, storage_options)
    if storage.isdir():
        names = set(storage.listdir())
        if MANIFEST_NAME in names:
            return ShardckptSource(storage)
        if DCP_METADATA in names:
            return DcpSource(storage, trust_pickle)
        if HF_INDEX in names:
            files, index = read_hf_index(storage)
            return SafetensorsSource(storage, files, index, fmt="hf-safetensors")
        if HF_SINGLE in names:
            return SafetensorsSource(storage, [HF_SINGLE], fmt="hf-safetensors")
        if DATA_DIR in names:  # a shardckpt save that never committed: IncompleteCheckpointError
            return ShardckptSource(storage)
        raise UnsupportedFormatError(
            f"{storage.url}: not a checkpoint convert knows: no {MANIFEST_NAME} (shardckpt), {DCP_METADATA} "
            f"(torch.distributed.checkpoint), {HF_INDEX} or {HF_SINGLE} (Hugging Face) in it; "
            f"found {sorted(names)[:10]}", path=storage.url)
    if not storage.exists():
        raise CheckpointNotFoundError(f"nothing at {storage.url}", path=storage.url)
    parent, name = _split(url)
    low = name.lower()
    if low.endswith(".safetensors"):
        return SafetensorsSource(open_storage(parent, storage_options), [name])
    if low.endswith(_TORCH_SUFFIXES):
        return TorchSource(open_storage(parent, storage_options), name, _local_path(url), trust_pickle)
    raise UnsupportedFormatError(
        f"{storage.url}: unknown file type {name!r}: convert reads .safetensors and torch.save files "
        f"({', '.join(_TORCH_SUFFIXES)}), or a checkpoint directory", path=storage.url)


def _target(to: str | None, dst: str, shard_limit: int | None) -> str:
    low = dst.lower().rstrip("/")
    if to is None:
        if low.endswith(".safetensors") or shard_limit is not None:
            to = "safetensors"
        elif low.endswith((".pt", ".pth")):
            to = "torch"
        else:
            to = "shardckpt"
    if to not in TARGETS:
        raise ValueError(f"to={to!r}: choose one of {TARGETS}")
    if shard_limit is not None and (to != "safetensors" or low.endswith(".safetensors")):
        raise ValueError("max_shard_size writes a Hugging Face directory of safetensors files: give a "
                         "directory as the destination (and to='safetensors' or no to=)")
    return to


def convert(
    src: PathLike,
    dst: PathLike,
    *,
    to: str | None = None,
    only: str | None = None,
    max_shard_size: int | str | None = None,
    dtype: str | torch.dtype | None = None,
    compression: None | str | Compression = "auto",
    storage_options: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    progress: bool = False,
) -> ConvertReport:
    """Convert the checkpoint at ``src`` into a new one at ``dst``, streaming.

    Sources (detected): a shardckpt checkpoint (``manifest.json``), a DCP
    checkpoint (``.metadata``), a ``torch.save`` file (``.pt``, ``.pth``,
    ``.bin``), a ``.safetensors`` file, or a Hugging Face directory
    (``model.safetensors.index.json`` or ``model.safetensors``). Anything else
    raises ``UnsupportedFormatError``.

    Target: ``to`` (``"shardckpt"``, ``"safetensors"``, ``"torch"``, ``"dcp"``),
    else from ``dst``: ``*.safetensors`` one safetensors file, ``*.pt``/``*.pth``
    a ``torch.save`` of the nested dict, otherwise a shardckpt checkpoint
    directory. ``max_shard_size`` (``"5GB"``, ``"500MB"``, bytes) writes Hugging
    Face's sharded layout into the directory ``dst``. Nothing existing is ever
    replaced (``CheckpointExistsError``).

    Keys are flattened with ``.`` as DCP flattens nested dicts. ``only="model"``
    keeps the keys under ``model.`` and strips that prefix (``"state.model"``
    turns a TrainState checkpoint into plain parameter names). ``dtype``
    (``"bf16"``, ``"fp16"``, ``"fp32"``) casts floating tensors only.
    Non-tensor values go into safetensors ``__metadata__`` as JSON text where
    they have an exact JSON form; every key not written is in
    ``report.dropped`` with the reason (and logged).

    Memory: a few read buffers (``knobs.max_read_bytes`` in all) plus, for
    tensors whose stored slices are not row blocks, one tensor at a time. A
    ``torch.save`` target is the exception: torch.save serializes one object, so
    it holds every tensor at once.

    Safety: nothing read runs code. ``torch.save`` files and DCP values load with
    ``weights_only=True``, DCP's ``.metadata`` with an unpickler that admits only
    DCP's metadata classes; a refusal raises ``UnsupportedFormatError`` naming the
    refused global. ``trust_pickle=True`` loads ``torch.save`` files and DCP
    values with ``weights_only=False`` (loud warning): only for a file you made.

    ``compression`` applies to a shardckpt target as in ``save``.
    ``storage_options`` go to the backends of both ``src`` and ``dst``.
    ``progress=True`` shows a tqdm bar on a terminal, plain lines otherwise.

    >>> shardckpt.convert("ckpts/step_100", "model.safetensors", only="model")
    >>> shardckpt.convert("ckpts/step_100", "hf_out/", only="state.model", max_shard_size="5GB", dtype="bf16")
    >>> shardckpt.convert("pytorch_model.bin", "ckpts/imported")
    """
    t0 = time.perf_counter()
    src_url, dst_url = os.fspath(src), os.fspath(dst)
    shard_limit = parse_size(max_shard_size)
    to = _target(to, dst_url, shard_limit)
    cast = parse_dtype(dtype)
    if compression != "auto":
        resolve_compression(compression)  # a bad argument is a usage error, raised before any I/O
    check_storage_options(storage_options)
    max_bytes = knobs.get().max_read_bytes
    source = open_source(src_url, storage_options, trust_pickle)
    try:
        plan = make_plan(source.items(), only, cast)
        written = _write_with_progress(progress, to, dst_url, shard_limit, plan, source, compression,
                                       storage_options, max_bytes, f"convert {_split(src_url)[1]} -> "
                                       f"{_split(dst_url)[1]}")
    finally:
        source.close()
    chosen = [d for d in source.dropped if only is None or d.key.startswith(only + ".")]
    dropped = tuple(chosen + written.dropped)
    if dropped:
        log.warning("convert %s -> %s: %d key(s) not converted: %s", src_url, dst_url, len(dropped),
                    "; ".join(f"{d.key}: {d.reason}" for d in dropped[:5]) + (" ..." if len(dropped) > 5 else ""))
    fmt = "hf-safetensors" if to == "safetensors" and not dst_url.lower().endswith(".safetensors") else to
    return ConvertReport(src_url, dst_url, source.format, fmt, tuple(written.keys), written.bytes_written,
                         dropped, tuple(written.files), time.perf_counter() - t0)


def _write_with_progress(progress: bool, to: str, dst: str, shard_limit: int | None, plan: Any, source: Source,
                         compression: Any, storage_options: Mapping[str, Any] | None, max_bytes: int,
                         desc: str) -> Written:
    from ..cli.progress import Progress  # (here: the command line imports this module)

    bar = Progress(desc, progress, total=plan.tensor_bytes)
    try:
        return _write(to, dst, shard_limit, plan, source, compression, storage_options, max_bytes, bar.start())
    finally:
        bar.finish()


def _write(to: str, dst: str, shard_limit: int | None, plan: Any, source: Source, compression: Any,
           storage_options: Mapping[str, Any] | None, max_bytes: int, bar: ByteProgress) -> Written:
    if to == "shardckpt":
        return write_shardckpt(open_storage(dst, storage_options), plan, source, compression, max_bytes, bar)
    if to == "dcp":
        storage = open_storage(dst, storage_options)
        require_empty_dir(storage)
        return write_dcp(storage, plan, source, max_bytes, bar)
    if to == "safetensors" and not dst.lower().endswith(".safetensors"):
        storage = open_storage(dst, storage_options)
        require_empty_dir(storage)
        return write_hf_dir(storage, plan, source, shard_limit or (1 << 62), max_bytes, bar)
    parent, name = _split(dst)
    storage = open_storage(parent, storage_options)
    require_absent(storage, name)
    storage.makedirs("")
    if to == "safetensors":
        return write_safetensors(storage, name, plan, source, max_bytes, bar)
    return write_torch(storage, name, plan, source, max_bytes, bar)
