"""A rank's *local view* of a state_dict: what the local tier stores for it.

Every ``DTensor`` becomes its local shard (a view sharing its storage, so a
load into the view fills the DTensor in place); plain tensors and other values
stay as they are; dicts, and lists/tuples holding tensors, are walked like
DCP walks them. ``layout`` describes every tensor (key -> shape, dtype, and
for a DTensor its global shape, stride, placements, mesh shape and this rank's
mesh coordinate): the local tier only loads a shard into a rank whose layout
is the same, and the durable tier's copy is rebuilt from the staged view with
the original DTensors' meshes and placements.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.tensor import DTensor

from ...engine.staging import StagingPool
from ...format import jsoncodec

__all__ = ["LocalView", "local_view", "layout_digest", "write_back"]

Path = tuple[Any, ...]


def _walk(value: Any, path: Path, leaf: Callable[[Path, Any], Any]) -> Any:
    """A copy of the containers of ``value`` with ``leaf(path, v)`` at every leaf."""
    if isinstance(value, dict):
        return {k: _walk(v, (*path, k), leaf) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and _has_tensor(value):
        return type(value)(_walk(v, (*path, i), leaf) for i, v in enumerate(value))
    return leaf(path, value)


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_tensor(v) for v in value)
    return False


def _key(path: Path) -> str:
    return ".".join(str(p) for p in path)


def _describe(t: torch.Tensor) -> dict[str, Any]:
    d: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if isinstance(t, DTensor):
        mesh = t.device_mesh
        d.update(global_shape=list(t.shape), global_stride=list(t.stride()),
                 placements=[str(p) for p in t.placements], mesh_shape=list(mesh.shape),
                 coordinate=mesh.get_coordinate(), shape=list(t.to_local().shape))
    return d


class LocalView:
    """``tree``: the state_dict with every DTensor replaced by its local shard;
    ``layout``: key -> description; ``dtensors``: key -> the original DTensor."""

    def __init__(self, tree: dict[str, Any], layout: dict[str, dict[str, Any]], dtensors: dict[str, DTensor]) -> None:
        self.tree, self.layout, self.dtensors = tree, layout, dtensors

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        found: list[tuple[str, torch.Tensor]] = []

        def leaf(path: Path, v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                found.append((_key(path), v))
            return v

        _walk(self.tree, (), leaf)
        return iter(found)

    def staged(self, pool: StagingPool) -> LocalView:
        """A snapshot: every tensor copied into ``pool``'s reused buffers (the only
        part of a local save that blocks the caller), every other value deep-copied."""
        items = [(MetadataIndex(fqn=k), t) for k, t in self.tensors()]
        copies = pool.stage(items)

        def leaf(path: Path, v: Any) -> Any:
            if not isinstance(v, torch.Tensor):
                return copy.deepcopy(v)
            s = copies[MetadataIndex(fqn=_key(path))]
            view, _ = next(s.pieces)
            if s.nbytes == 0:
                return torch.empty(v.shape, dtype=v.dtype)
            return torch.frombuffer(view, dtype=torch.uint8).view(v.dtype).view(v.shape)

        return LocalView(_walk(self.tree, (), leaf), self.layout, self.dtensors)

    def rebuilt(self) -> dict[str, Any]:
        """The global state_dict again: every staged local shard wrapped in a DTensor
        with its original's mesh and placements (no communication)."""
        def leaf(path: Path, v: Any) -> Any:
            orig = self.dtensors.get(_key(path))
            if orig is None:
                return v
            return DTensor.from_local(v, orig.device_mesh, orig.placements, run_check=False,
                                      shape=orig.shape, stride=orig.stride())

        return _walk(self.tree, (), leaf)


def local_view(state_dict: dict[str, Any]) -> LocalView:
    """The local view of ``state_dict`` (see the module docstring)."""
    layout: dict[str, dict[str, Any]] = {}
    dtensors: dict[str, DTensor] = {}

    def leaf(path: Path, v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        key = _key(path)
        if not isinstance(v, DTensor) and type(v) is not torch.Tensor and not isinstance(v, torch.nn.Parameter):
            raise TypeError(f"the local tier stores plain tensors and DTensors; {key!r} is a "
                            f"{type(v).__name__} (save it without local_root)")
        layout[key] = _describe(v)
        if isinstance(v, DTensor):
            dtensors[key] = v
            return v.to_local().detach()
        return v.detach()

    return LocalView(_walk(state_dict, (), leaf), layout, dtensors)


def layout_digest(layout: dict[str, dict[str, Any]]) -> str:
    """A short digest of a layout: equal digests, equal shapes, dtypes and placements."""
    return hashlib.sha256(jsoncodec.encode(layout, tuples=True)).hexdigest()[:32]


def write_back(target: Any, loaded: Any) -> None:
    """After a load into a view: put its non-tensor values into ``target`` (tensors
    were filled in place), container by container."""
    if isinstance(target, dict) and isinstance(loaded, dict):
        for k, v in loaded.items():
            if isinstance(target.get(k), torch.Tensor):
                continue
            if (isinstance(v, dict) or (isinstance(v, list) and _has_tensor(target.get(k)))) \
                    and isinstance(target.get(k), type(v)):
                write_back(target[k], v)
            else:
                target[k] = v
    elif isinstance(target, list) and isinstance(loaded, list):
        for i, v in enumerate(loaded):
            if isinstance(target[i], torch.Tensor):
                continue
            if isinstance(v, (dict, list)) and isinstance(target[i], type(v)):
                write_back(target[i], v)
            else:
                target[i] = v
