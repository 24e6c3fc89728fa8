"""Save and load a trainer's whole checkpoint (a nested dict, ``tree``) as one
shardckpt checkpoint: the flat items of ``tree.split`` go through
``shardckpt.save`` / ``load`` (every byte checksummed, manifest last), the
skeleton rides in the manifest's metadata under ``TREE_KEY``.

A load builds its own template from the manifest (a tensor of the stored shape
and dtype per tensor item), except where the caller hands in live tensors to
load into (a sharded model's DTensors: resharded in place).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from ..api import async_save, load, save
from ..engine.async_save import AsyncSaveHandle
from ..errors import CheckpointMismatchError, CorruptCheckpointError, UnsupportedFormatError
from ..format.entries import TensorEntry
from ..format.layout import dtype_from_name
from ..format.manifest import Manifest
from ..store import CheckpointDir
from . import tree

__all__ = ["TREE_KEY", "save_tree", "read_manifest", "skeleton_of", "load_tree", "subtree", "check_state_dict",
           "stored_shapes"]

#: The manifest metadata key holding a trainer checkpoint's skeleton.
TREE_KEY = "shardckpt.tree"

StorageOptions = Mapping[str, Any] | None


def save_tree(
    state: Any,
    path: str | os.PathLike[str],
    *,
    process_group: dist.ProcessGroup | None = None,
    storage_options: StorageOptions = None,
    compression: Any = "auto",
    background: bool = False,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> AsyncSaveHandle | None:
    """Save ``state`` (any nesting of dicts, lists, tuples, tensors and values) at
    ``path``. Collective over ``process_group`` like ``shardckpt.save``. With
    ``background`` return once staged (the handle; None on ranks that staged
    nothing to wait for)."""
    skeleton, flat = tree.split(state)
    meta = {**(metadata or {}), TREE_KEY: skeleton}
    kw: dict[str, Any] = dict(overwrite=overwrite, metadata=meta, compression=compression,
                              process_group=process_group, storage_options=storage_options)
    if background:
        return async_save(flat, path, **kw)
    save(flat, path, **kw)
    return None


def read_manifest(path: str | os.PathLike[str], storage_options: StorageOptions = None) -> Manifest:
    """The committed manifest at ``path`` with every shard file present at its size."""
    return CheckpointDir.at(os.fspath(path), storage_options).read_checked()


def skeleton_of(manifest: Manifest, path: str | os.PathLike[str]) -> Any:
    """The skeleton stored with a trainer checkpoint, checked against its entries."""
    skeleton = manifest.metadata.get(TREE_KEY)
    if skeleton is None:
        raise UnsupportedFormatError(
            f"{os.fspath(path)} is a shardckpt checkpoint but not one a trainer integration wrote "
            f"(no {TREE_KEY!r} in its metadata); load it with shardckpt.load into a state_dict",
            path=os.fspath(path))
    for key in tree.leaves(skeleton):
        if key not in manifest.entries:
            raise CorruptCheckpointError(f"{os.fspath(path)}: the checkpoint's structure names key {key!r} "
                                         "but its manifest has no such entry", key=key, path=os.fspath(path))
    return skeleton


def _template(manifest: Manifest, keys: list[str], live: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in keys:
        if key in live:
            out[key] = live[key]
            continue
        e = manifest.entries[key]
        # a non-tensor value (an ObjectEntry) is replaced by the load, not filled
        out[key] = torch.empty(e.shape, dtype=dtype_from_name(e.dtype)) if isinstance(e, TensorEntry) else None
    return out


def load_tree(
    path: str | os.PathLike[str],
    *,
    process_group: dist.ProcessGroup | None = None,
    storage_options: StorageOptions = None,
    live: Any = None,
    manifest: Manifest | None = None,
    skip: tuple[str, ...] = (),
) -> Any:
    """The tree saved at ``path``, every chunk's CRC32C checked. ``live``: a tree
    of the same form whose tensors are loaded into in place (resharding DTensors);
    items it lacks are read whole onto the CPU. ``skip``: top-level keys not read
    (absent from the result). Collective over ``process_group``."""
    m = manifest if manifest is not None else read_manifest(path, storage_options)
    skeleton = _without(skeleton_of(m, path), skip)
    live_flat = tree.split(live)[1] if live is not None else {}
    live_flat = {k: v for k, v in live_flat.items() if isinstance(v, torch.Tensor)}
    flat = _template(m, tree.leaves(skeleton), live_flat)
    # strict unless parts are skipped: the template comes from this manifest, so
    # only skipped keys can be on one side only
    load(flat, path, strict=not skip, process_group=process_group, storage_options=storage_options)
    return tree.join(skeleton, flat)


def _without(skeleton: Any, skip: tuple[str, ...]) -> Any:
    if not skip or not isinstance(skeleton, dict) or len(skeleton) != 1:
        return skeleton
    ((kind, body),) = skeleton.items()
    if kind not in ("dict", "odict"):
        return skeleton
    return {kind: [pair for pair in body if pair[0] not in skip]}


def subtree(skeleton: Any, *path: str | int) -> Any | None:
    """The skeleton node at ``path`` (dict keys / list indexes), None where absent."""
    node = skeleton
    for part in path:
        if not isinstance(node, dict) or len(node) != 1:
            return None
        ((kind, body),) = node.items()
        if kind in ("dict", "odict"):
            node = next((v for k, v in body if k == part), None)
        elif kind in ("list", "tuple") and isinstance(part, int) and 0 <= part < len(body):
            node = body[part]
        else:
            return None
        if node is None:
            return None
    return node


def stored_shapes(manifest: Manifest, node: Any) -> dict[str, tuple[int, ...] | None]:
    """Name -> stored shape (None for a non-tensor value) of a dict node's items."""
    if not isinstance(node, dict) or len(node) != 1:
        return {}
    ((kind, body),) = node.items()
    if kind not in ("dict", "odict"):
        return {}
    out: dict[str, tuple[int, ...] | None] = {}
    for name, child in body:
        ((ckind, key),) = child.items()
        e = manifest.entries.get(key) if ckind == "leaf" else None
        out[str(name)] = tuple(e.shape) if isinstance(e, TensorEntry) else None
    return out


def check_state_dict(manifest: Manifest, path: str | os.PathLike[str], where: tuple[str | int, ...],
                     live: Mapping[str, Any], strict: bool = True) -> None:
    """Raise ``CheckpointMismatchError`` naming the checkpoint and every key where the
    model state stored under ``where`` does not fit ``live`` (a model's state_dict):
    a shape differs, or (``strict``) a key is on one side only. Checked from the
    manifest alone, before any data is read."""
    node = subtree(skeleton_of(manifest, path), *where)
    label = ".".join(str(p) for p in where)
    if node is None:
        raise CheckpointMismatchError(f"{os.fspath(path)} holds no {label!r}: not a checkpoint of this model",
                                      missing=[label], unexpected=[], mismatched={}, path=os.fspath(path))
    stored = stored_shapes(manifest, node)
    mismatched: dict[str, str] = {}
    for name, value in live.items():
        have = stored.get(name)
        if isinstance(value, torch.Tensor) and name in stored and have != tuple(value.shape):
            mismatched[name] = f"shape {list(have) if have is not None else 'non-tensor'} in the checkpoint, " \
                               f"{list(value.shape)} in the model"
    missing = sorted(set(live) - set(stored)) if strict else []
    unexpected = sorted(set(stored) - set(live)) if strict else []
    if mismatched or missing or unexpected:
        parts = [f"{k!r}: {why}" for k, why in sorted(mismatched.items())]
        parts += [f"{k!r} missing from the checkpoint" for k in missing[:10]]
        parts += [f"{k!r} not in the model" for k in unexpected[:10]]
        first = next(iter(sorted(mismatched) or missing or unexpected))
        raise CheckpointMismatchError(
            f"{os.fspath(path)} does not fit this model ({label}): " + "; ".join(parts),
            missing=missing, unexpected=unexpected, mismatched=mismatched, key=f"{label}.{first}",
            path=os.fspath(path))
