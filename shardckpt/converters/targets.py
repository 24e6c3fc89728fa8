"""Writing safetensors (one file, or Hugging Face's sharded layout), ``torch.save``
and DCP outputs from a plan and a source.

safetensors: the header (every offset) is computed from the plan before any data
moves, then tensors stream through ``OutFile`` piece by piece; memory stays at a
few read buffers whatever the tensor sizes. Non-tensor values go into
``__metadata__`` as JSON text where they have an exact JSON form (with
``"format": "pt"``, which transformers requires of any file with metadata);
others are listed as dropped. The sharded layout is save_pretrained's: tensors in
source order, a new ``model-XXXXX-of-YYYYY.safetensors`` when the next tensor
would pass ``max_shard_size`` (a larger tensor gets a file of its own), the
non-tensor values in the first file, ``model.safetensors.index.json`` with
``weight_map`` and ``metadata.total_size`` (tensor bytes) published last; when
everything fits in one file it is ``model.safetensors`` with no index, as
save_pretrained does.

``torch.save`` needs the whole nested dict in memory, so that target holds every
tensor at once (the one exception to bounded memory). DCP's format holds each
tensor as a ``torch.save`` blob, so that target holds one tensor at a time.
"""

from __future__ import annotations

import json
import pickle
import typing
import uuid
from collections.abc import Iterator, Sequence
from typing import IO, Any

import torch
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION

from ..backends import Storage
from ..compat import DcpStorageInfo, unflatten_state_dict
from .items import ByteProgress, Dropped, Source
from .output import OutFile, Written, checked_pieces, encoded_objects
from .safetensors_format import METADATA_KEY, build_header, layout_order, st_dtype_name
from .selection import Plan, Planned
from .source_dcp import DCP_METADATA
from .source_files import HF_INDEX, HF_SINGLE

__all__ = ["write_safetensors", "write_hf_dir", "write_torch", "write_dcp", "shard_files"]

_FORMAT_KEY = "format"  # transformers refuses a file whose metadata lacks format=pt
_META_LIMIT = 16 << 20


def _st_metadata(source: Source, plan: Plan, done: Written) -> dict[str, str]:
    meta = {_FORMAT_KEY: "pt"}
    src_key = {o.key: o.item.key for o in plan.objects}
    for o, (enc, payload, value) in encoded_objects(source, plan.objects, done):
        if o.key in meta or o.key == METADATA_KEY:
            done.dropped.append(Dropped(o.item.key, f"name {o.key!r} is reserved in safetensors metadata"))
        elif enc != "json":
            done.dropped.append(Dropped(o.item.key, f"a {type(value).__name__} value has no exact JSON form "
                                        "for safetensors metadata"))
        else:
            meta[o.key] = payload.decode()
    # the header must stay far below the format's limit (and readers parse it whole)
    while sum(len(k) + len(v) for k, v in meta.items()) > _META_LIMIT:
        big = max((k for k in meta if k != _FORMAT_KEY), key=lambda k: len(meta[k]))
        done.dropped.append(Dropped(src_key[big], f"its JSON text ({len(meta.pop(big))} chars) is too large for a "
                                         f"safetensors header (metadata is kept under {_META_LIMIT} bytes)"))
    done.keys += [k for k in meta if k != _FORMAT_KEY]
    return meta


def _st_tensors(plan: Plan, done: Written) -> list[Planned]:
    ok = []
    for p in plan.tensors:
        if st_dtype_name(p.dtype) is None:
            done.dropped.append(Dropped(p.item.key, f"safetensors has no dtype for {p.dtype}"))
        elif p.key == METADATA_KEY:
            done.dropped.append(Dropped(p.item.key, f"{METADATA_KEY!r} is reserved in safetensors"))
        else:
            ok.append(p)
    return ok


def _write_st_file(storage: Storage, rel: str, tensors: Sequence[Planned], meta: dict[str, str], source: Source,
                   max_bytes: int, progress: ByteProgress, done: Written) -> None:
    order = [tensors[i] for i in layout_order([(p.key, p.dtype) for p in tensors])]
    header, _ = build_header([(p.key, p.dtype, p.item.shape) for p in order], meta)
    out = OutFile(storage, rel)
    try:
        out.write(header)
        for _, data in checked_pieces(source, order, max_bytes, progress):
            out.write(data)
        out.close()
    except BaseException:
        out.abort()
        raise
    done.files.append(out.url)
    done.bytes_written += out.size
    done.keys += [p.key for p in order]


def write_safetensors(storage: Storage, rel: str, plan: Plan, source: Source, max_bytes: int,
                      progress: ByteProgress) -> Written:
    """One safetensors file ``rel`` (which must not exist) under ``storage``."""
    done = Written()
    tensors = _st_tensors(plan, done)
    meta = _st_metadata(source, plan, done)
    _write_st_file(storage, rel, tensors, meta, source, max_bytes, progress, done)
    return done


def shard_files(tensors: Sequence[Planned], limit: int) -> list[list[Planned]]:
    """save_pretrained's split: in order, a new shard when the next tensor would
    pass ``limit`` (a tensor larger than ``limit`` gets a shard of its own)."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for p in tensors:
        if shards[-1] and size + p.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def write_hf_dir(storage: Storage, plan: Plan, source: Source, limit: int, max_bytes: int,
                 progress: ByteProgress) -> Written:
    """A Hugging Face directory at ``storage`` (empty or absent): sharded with an index,
    or one ``model.safetensors`` when everything fits in ``limit``."""
    done = Written()
    tensors = _st_tensors(plan, done)
    meta = _st_metadata(source, plan, done)
    shards = shard_files(tensors, limit)
    storage.makedirs("")
    if len(shards) == 1:
        _write_st_file(storage, HF_SINGLE, shards[0], meta, source, max_bytes, progress, done)
        return done
    n = len(shards)
    weight_map: dict[str, str] = {}
    try:
        for i, shard in enumerate(shards):
            rel = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            _write_st_file(storage, rel, shard, meta if i == 0 else {_FORMAT_KEY: "pt"}, source, max_bytes,
                           progress, done)
            weight_map.update((p.key, rel) for p in shard)
        # keys sorted as Hugging Face's own writer sorts them
        index = {"metadata": {"total_size": sum(p.nbytes for p in tensors)},
                 "weight_map": dict(sorted(weight_map.items()))}
        out = OutFile(storage, HF_INDEX)
        try:
            out.write(json.dumps(index, indent=2).encode() + b"\n")
            out.close()
        except BaseException:
            out.abort()
            raise
    except BaseException:
        for url in done.files:  # shard files of this conversion, useless without the index
            storage.remove(url.rsplit("/", 1)[-1])
        raise
    done.files.append(out.url)
    done.bytes_written += out.size
    return done


def _materialize(source: Source, tensors: Sequence[Planned], max_bytes: int,
                 progress: ByteProgress) -> Iterator[tuple[Planned, torch.Tensor]]:
    """``(planned, tensor)`` in order, each assembled from the stream, one at a time."""
    rest = iter(tensors)
    current: Planned | None = None
    flat = torch.empty(0)
    pos = 0
    for p, data in checked_pieces(source, tensors, max_bytes, progress):
        if p is not current:
            if current is not None:
                yield current, flat.view(current.item.shape)
            for q in rest:  # those before p have no elements (checked_pieces checks that)
                if q is p:
                    break
                yield q, torch.empty(q.item.shape, dtype=q.dtype)
            flat = torch.empty(0)  # drop ours before allocating the next (the consumer dropped its own)
            current, flat, pos = p, torch.empty(p.item.numel, dtype=p.dtype), 0
        flat.view(torch.uint8)[pos:pos + data.nbytes].copy_(torch.frombuffer(data, dtype=torch.uint8))
        pos += data.nbytes
    if current is not None:
        yield current, flat.view(current.item.shape)
    for q in rest:
        yield q, torch.empty(q.item.shape, dtype=q.dtype)


def write_torch(storage: Storage, rel: str, plan: Plan, source: Source, max_bytes: int,
                progress: ByteProgress) -> Written:
    """``torch.save`` of the nested dict (all tensors in memory at once: torch.save
    serializes one object). Every value in it loads with ``weights_only=True``."""
    done = Written()
    flat: dict[str, Any] = {}
    paths: dict[str, tuple[str | int, ...]] = {}
    for p, t in _materialize(source, plan.tensors, max_bytes, progress):
        flat[p.key], paths[p.key] = t, p.key_path
    for o, (enc, _, value) in encoded_objects(source, plan.objects, done):
        if enc == "bytesio":  # torch.save would pickle the class: not weights-only loadable
            done.dropped.append(Dropped(o.item.key, "an io.BytesIO value has no weights-only torch.save form"))
            continue
        flat[o.key], paths[o.key] = value, o.key_path
    nested = unflatten_state_dict(flat, paths)  # type: ignore[arg-type]
    out = OutFile(storage, rel)
    try:
        torch.save(nested, typing.cast(IO[bytes], out))
        out.close()
    except BaseException:
        out.abort()
        raise
    done.files.append(out.url)
    done.bytes_written = out.size
    done.keys = list(flat)
    return done


def write_dcp(storage: Storage, plan: Plan, source: Source, max_bytes: int, progress: ByteProgress) -> Written:
    """A DCP checkpoint as one rank's ``FileSystemWriter`` writes it: ``__0_0.distcp``
    (a ``torch.save`` blob per item), then ``.metadata`` last (its existence commits)."""
    done = Written()
    storage.makedirs("")
    data_rel = "__0_0.distcp"
    sd_md: dict[str, Any] = {}
    storage_data: dict[Any, Any] = {}
    paths: dict[str, tuple[str | int, ...]] = {}
    out = OutFile(storage, data_rel)
    try:
        for p, t in _materialize(source, plan.tensors, max_bytes, progress):
            start = out.size
            torch.save(t, typing.cast(IO[bytes], out))
            zero = torch.Size([0] * t.dim())
            sd_md[p.key] = dcp_md.TensorStorageMetadata(
                dcp_md.TensorProperties(dtype=p.dtype), t.shape, [dcp_md.ChunkStorageMetadata(zero, t.shape)])
            storage_data[dcp_md.MetadataIndex(p.key, zero)] = DcpStorageInfo(data_rel, start, out.size - start)
            paths[p.key] = p.key_path
            del t  # one tensor at a time: gone before the next is assembled
        for o, (_, _, value) in encoded_objects(source, plan.objects, done):
            start = out.size
            torch.save(value, typing.cast(IO[bytes], out))
            sd_md[o.key] = dcp_md.BytesStorageMetadata()
            storage_data[dcp_md.MetadataIndex(o.key)] = DcpStorageInfo(data_rel, start, out.size - start)
            paths[o.key] = o.key_path
        out.close()
    except BaseException:
        out.abort()
        raise
    md = dcp_md.Metadata(state_dict_metadata=sd_md, planner_data=paths, storage_data=storage_data,
                         storage_meta=dcp_md.StorageMeta(save_id=str(uuid.uuid4())), version=CURRENT_DCP_VERSION)
    meta_out = OutFile(storage, DCP_METADATA)
    try:
        meta_out.write(pickle.dumps(md))  # we write this pickle; reading one back goes through source_dcp
        meta_out.close()
    except BaseException:
        meta_out.abort()
        storage.remove(data_rel)
        raise
    done.files += [out.url, meta_out.url]
    done.bytes_written = out.size + meta_out.size
    done.keys = list(sd_md)
    return done
