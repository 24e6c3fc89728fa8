"""What a conversion will write, decided before any data moves: which keys (the
``only=`` prefix), under which names, in which dtype (``dtype=``), and the
parsing of the user's size and dtype arguments."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .items import Item, ObjectItem, TensorItem

__all__ = ["Planned", "PlannedObject", "Plan", "make_plan", "parse_size", "parse_dtype", "strip_prefix"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def parse_size(size: int | str | None) -> int | None:
    """``"5GB"`` (10^9, as Hugging Face counts), ``"500MiB"`` (2^20), or bytes as an int."""
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"max_shard_size {size!r}: expected e.g. '5GB', '500MB', '2GiB' or a number of bytes")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    else:
        raise TypeError(f"max_shard_size must be an int or a string like '5GB', not {type(size).__name__}")
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"`` / ``"fp16"`` / ``"fp32"`` (or the torch dtype)."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype={dtype}: casting is to bf16, fp16 or fp32")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype={dtype!r}: use 'bf16', 'fp16' or 'fp32'")


def strip_prefix(key: str, key_path: Sequence[str | int], prefix: str) -> tuple[str, tuple[str | int, ...]] | None:
    """``key`` and its nesting with ``prefix.`` removed, or None if not under it.

    The prefix may end inside a path element (``only="model.layers"`` on the
    element ``"layers.0.weight"`` of a flat safetensors name leaves ``"0.weight"``)."""
    if not key.startswith(prefix + "."):
        return None
    rest = key[len(prefix) + 1:]
    joined = ""
    for i, part in enumerate(key_path):
        joined = f"{joined}.{part}" if i else str(part)
        if joined == prefix:
            tail = tuple(key_path[i + 1:])
            return rest, tail if tail else (rest,)
        if joined.startswith(prefix + "."):
            return rest, (joined[len(prefix) + 1:], *key_path[i + 1:])
    return rest, (rest,)


@dataclass(frozen=True)
class Planned:
    """A tensor to write: source item, output name and nesting, output dtype."""

    item: TensorItem
    key: str
    key_path: tuple[str | int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.item.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class PlannedObject:
    item: ObjectItem
    key: str
    key_path: tuple[str | int, ...]


@dataclass
class Plan:
    tensors: list[Planned] = field(default_factory=list)
    objects: list[PlannedObject] = field(default_factory=list)

    @property
    def tensor_bytes(self) -> int:
        return sum(p.nbytes for p in self.tensors)


def make_plan(items: Sequence[Item], only: str | None, cast: torch.dtype | None) -> Plan:
    """Select and rename by ``only``; pick each tensor's output dtype (``cast``
    applies to floating tensors only)."""
    if only is not None:
        if not isinstance(only, str) or not only.strip(".") or only != only.strip("."):
            raise ValueError(f"only={only!r}: expected a dotted key prefix such as 'model' or 'state.model'")
    plan = Plan()
    for it in items:
        if only is None:
            key, path = it.key, tuple(it.key_path)
        else:
            got = strip_prefix(it.key, it.key_path, only)
            if got is None:
                continue
            key, path = got
        if isinstance(it, TensorItem):
            out = cast if cast is not None and it.dtype.is_floating_point else it.dtype
            plan.tensors.append(Planned(it, key, path, out))
        else:
            plan.objects.append(PlannedObject(it, key, path))
    if only is not None and not plan.tensors and not plan.objects:
        tops = sorted({it.key.split(".", 1)[0] for it in items})
        raise ValueError(f"only={only!r}: no key starts with {only + '.'!r}; top-level names here: {tops[:20]}")
    return plan
