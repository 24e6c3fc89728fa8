"""A trainer's checkpoint (a nested dict of tensors and values) as the flat items
shardckpt stores, and back, exactly.

DCP's flattening (what ``shardckpt.save`` applies to a nested dict) drops empty
containers, turns an int-keyed dict into a list on the way back and walks every
dict; a trainer's checkpoint needs all of them back as they were (Lightning's
empty ``loops.fit_loop.state_dict``, an optimizer's ``state`` keyed by int, a
``param_groups`` list of dicts). So the integrations split the tree themselves:
a container that holds a tensor is walked, anything else is one stored value,
and a JSON *skeleton* recording every walked container's type and keys travels
in the manifest's metadata. Skeleton nodes::

    {"dict": [[key, node], ...]}       key: str or int (JSON keeps which)
    {"odict": [[key, node], ...]}      an OrderedDict (a module's state_dict)
    {"list": [node, ...]}  {"tuple": [node, ...]}
    {"leaf": "flat.key"}               a tensor or a stored value
    {"boxed": "flat.key"}              a dict/list value stored inside a 1-tuple, so
                                       that DCP's flattening keeps it whole
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import UnsupportedFormatError

__all__ = ["split", "join", "leaves", "holds_tensor"]

Skeleton = dict[str, Any]


def holds_tensor(value: Any) -> bool:
    """Whether ``value`` is a tensor or a dict/list/tuple with one somewhere inside."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(holds_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(holds_tensor(v) for v in value)
    return False


class _Splitter:
    def __init__(self) -> None:
        self.flat: dict[str, Any] = {}

    def key(self, path: tuple[Any, ...]) -> str:
        base = ".".join(str(p) for p in path) or "value"
        key, n = base, 1
        while key in self.flat:  # "a.b" as one key and a -> b nested: both kept
            key, n = f"{base}#{n}", n + 1
        return key

    def node(self, value: Any, path: tuple[Any, ...]) -> Skeleton:
        if holds_tensor(value) and not isinstance(value, torch.Tensor):
            if isinstance(value, Mapping):
                kind = "odict" if isinstance(value, OrderedDict) else "dict"
                items = []
                for k, v in value.items():
                    if not isinstance(k, (str, int)) or isinstance(k, bool):
                        where = ".".join(str(p) for p in path) or "<root>"
                        raise TypeError(f"cannot checkpoint the dict at {where!r}: key {k!r} is a "
                                        f"{type(k).__name__}; keys of dicts holding tensors must be str or int")
                    items.append([k, self.node(v, (*path, k))])
                return {kind: items}
            kind = "tuple" if isinstance(value, tuple) else "list"
            return {kind: [self.node(v, (*path, i)) for i, v in enumerate(value)]}
        key = self.key(path)
        if isinstance(value, (Mapping, list)):
            self.flat[key] = (value,)
            return {"boxed": key}
        self.flat[key] = value
        return {"leaf": key}


def split(tree: Any) -> tuple[Skeleton, dict[str, Any]]:
    """(skeleton, flat items): what ``join`` turns back into ``tree``."""
    s = _Splitter()
    skeleton = s.node(tree, ())
    return skeleton, s.flat


def _bad(where: str, why: str) -> UnsupportedFormatError:
    return UnsupportedFormatError(f"checkpoint structure at {where!r}: {why}")


def _pairs(items: Any, where: str) -> list[tuple[Any, Any]]:
    if not isinstance(items, list) or not all(isinstance(p, list) and len(p) == 2 for p in items):
        raise _bad(where, "a dict node must be a list of [key, node] pairs")
    for k, _ in items:
        if not isinstance(k, (str, int)) or isinstance(k, bool):
            raise _bad(where, f"dict key {k!r} is not a string or an integer")
    return [(k, v) for k, v in items]


def _nodes(items: Any, where: str) -> list[Any]:
    if not isinstance(items, list):
        raise _bad(where, "a list node must be a list")
    return items


def _kind(node: Any, where: str) -> tuple[str, Any]:
    if not isinstance(node, dict) or len(node) != 1:
        raise _bad(where, f"expected a one-key object, got {node!r:.80}")
    ((kind, body),) = node.items()
    if kind not in ("dict", "odict", "list", "tuple", "leaf", "boxed"):
        raise _bad(where, f"unknown node kind {kind!r}")
    return kind, body


def leaves(skeleton: Any) -> list[str]:
    """Every flat key ``skeleton`` refers to (validating its shape)."""
    out: list[str] = []

    def walk(node: Any, where: str) -> None:
        kind, body = _kind(node, where)
        if kind in ("leaf", "boxed"):
            if not isinstance(body, str):
                raise _bad(where, f"a {kind} must name a key, got {body!r}")
            out.append(body)
        elif kind in ("dict", "odict"):
            for k, v in _pairs(body, where):
                walk(v, f"{where}.{k}")
        else:
            for i, v in enumerate(_nodes(body, where)):
                walk(v, f"{where}.{i}")

    walk(skeleton, "<root>")
    return out


def join(skeleton: Any, flat: Mapping[str, Any]) -> Any:
    """The tree ``split`` took apart, rebuilt from its skeleton and loaded flat items."""

    def build(node: Any, where: str) -> Any:
        kind, body = _kind(node, where)
        if kind in ("leaf", "boxed") and (not isinstance(body, str) or body not in flat):
            raise _bad(where, f"names {body!r}, which is not a stored key")
        if kind == "leaf":
            return flat[body]
        if kind == "boxed":
            boxed = flat[body]
            if not isinstance(boxed, tuple) or len(boxed) != 1:
                raise _bad(where, f"stored value {body!r} should be a boxed container")
            return boxed[0]
        if kind in ("dict", "odict"):
            pairs = [(k, build(v, f"{where}.{k}")) for k, v in _pairs(body, where)]
            return OrderedDict(pairs) if kind == "odict" else dict(pairs)
        values = [build(v, f"{where}.{i}") for i, v in enumerate(_nodes(body, where))]
        return tuple(values) if kind == "tuple" else values

    return build(skeleton, "<root>")
