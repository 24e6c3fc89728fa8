"""Helpers shared by the test files: deterministic tensors, small states, load targets, state
equality, a gate that holds async saves in flight, and the repository root. Each lives here once; a test file that needs
a variant passes a parameter instead of keeping its own copy.

Only torch is imported at module level: spawned ranks and torchrun workers import
this module too.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "REPO_ROOT",
    "assert_state_equal",
    "blank_like",
    "det_tensor",
    "gate_writes",
    "mixed_state",
    "state_diff",
    "states_equal",
]

#: The repository root (the directory holding ``shardckpt/`` and ``tests/``): the
#: working directory or PYTHONPATH of subprocesses that import either. This module
#: stays at ``tests/``, so the root holds wherever a test file lives below it.
REPO_ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- values


def det_tensor(shape: Sequence[int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A tensor that depends only on ``(shape, dtype, seed)``, so every rank and
    every process builds the same one. int64 values span ``[-2**62, 2**62)``, beyond
    2**53, so a float round trip anywhere would show; any other dtype gets standard
    normal values drawn in float64, then cast."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int64:
        return torch.randint(-(2**62), 2**62, tuple(shape), generator=g, dtype=torch.int64)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float64).to(dtype)


def mixed_state(seed: int, *, w: tuple[int, int], ints: int, mod: int, halves: int, step: int,
                blob: bytes, tup: tuple) -> dict[str, Any]:
    """A small state of every storage kind: ``w`` float32 (random), ``i`` int64
    (``arange(ints) % mod``), ``h`` bfloat16 (random), and objects ``step`` (inline
    JSON), ``blob`` (bytes) and ``tup`` (a tuple)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(*w, generator=g),
        "i": torch.arange(ints, dtype=torch.int64) % mod,
        "h": torch.randn(halves, generator=g).to(torch.bfloat16),
        "step": step,
        "blob": blob,
        "tup": tup,
    }


def blank_like(sd: Mapping[str, Any], placeholders: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A load target for ``sd``: every tensor ``torch.zeros_like`` (same dtype, shape
    and strides; a DTensor stays a DTensor), nested dicts kept (loads flatten them),
    every other value ``placeholders[key]`` (``None`` for a key not given)."""
    placeholders = placeholders or {}
    out: dict[str, Any] = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            out[k] = torch.zeros_like(v)
        elif isinstance(v, dict):
            out[k] = blank_like(v, placeholders)
        else:
            out[k] = placeholders.get(k)
    return out


# ----------------------------------------------------------------------------- equality


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` in C order (so NaN payloads and -0.0 count)."""
    if not t.numel():
        return t
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this rank's shard, no collective


def state_diff(got: Any, want: Any, where: str = "", *, bitwise: bool = False,
               exact_types: bool = True) -> list[str]:
    """Every difference between ``got`` and ``want``, walked together.

    - dicts: the same keys, then each value;
    - lists and tuples: the same type and length, then each item;
    - tensors: a tensor on both sides with the same dtype and shape and equal values
      (``torch.equal``; with ``bitwise``, equal bytes, so NaNs compare and -0.0 differs
      from 0.0). A DTensor is compared by its local shard;
    - ``io.BytesIO``: exactly a BytesIO, with the same contents and position;
    - anything else: ``==``, and with ``exact_types`` the same type too (``1 != 1.0``,
      ``True != 1``).
    """
    path = where or "state"
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{path}: {type(got).__name__}, want a dict"]
        out = []
        if got.keys() != want.keys():
            out.append(f"{path}: keys missing {sorted(map(str, want.keys() - got.keys()))}, "
                       f"extra {sorted(map(str, got.keys() - want.keys()))}")
        for k in want:
            if k in got:
                out += state_diff(got[k], want[k], f"{where}.{k}" if where else str(k), bitwise=bitwise,
                                  exact_types=exact_types)
        return out
    if isinstance(want, (list, tuple)):
        if type(got) is not type(want) or len(got) != len(want):
            return [f"{path}: {type(got).__name__} of {len(got) if hasattr(got, '__len__') else '?'}, "
                    f"want {type(want).__name__} of {len(want)}"]
        out = []
        for i, (a, b) in enumerate(zip(got, want)):
            out += state_diff(a, b, f"{where}[{i}]", bitwise=bitwise, exact_types=exact_types)
        return out
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return [f"{path}: {type(got).__name__}, want a tensor"]
        g, w = _local(got), _local(want)
        if g.dtype != w.dtype or g.shape != w.shape:
            return [f"{path}: {g.dtype} {list(g.shape)}, want {w.dtype} {list(w.shape)}"]
        same = torch.equal(_raw(g), _raw(w)) if bitwise else torch.equal(g, w)
        return [] if same else [f"{path}: other values"]
    if isinstance(want, io.BytesIO):
        if type(got) is not io.BytesIO:
            return [f"{path}: {type(got).__name__}, want a BytesIO"]
        if (got.getvalue(), got.tell()) != (want.getvalue(), want.tell()):
            return [f"{path}: BytesIO {got.getvalue()!r} at {got.tell()}, want {want.getvalue()!r} at {want.tell()}"]
        return []
    if (exact_types and type(got) is not type(want)) or got != want:
        return [f"{path}: {got!r} ({type(got).__name__}), want {want!r} ({type(want).__name__})"]
    return []


def assert_state_equal(got: Any, want: Any, where: str = "", *, bitwise: bool = False,
                       exact_types: bool = True) -> None:
    """Fail naming every difference (``state_diff``) between ``got`` and ``want``."""
    problems = state_diff(got, want, where, bitwise=bitwise, exact_types=exact_types)
    assert not problems, "\n".join(problems[:20])


def states_equal(got: Any, want: Any, *, bitwise: bool = False, exact_types: bool = True) -> bool:
    """Whether ``state_diff`` finds no difference."""
    return not state_diff(got, want, bitwise=bitwise, exact_types=exact_types)


# ----------------------------------------------------------------------------- async saves


def gate_writes(monkeypatch: Any, wait_s: float) -> threading.Event:
    """From now on, every shard write waits (up to ``wait_s``) until the returned
    event is set: an async save stays in flight until then."""
    from shardckpt.io.save_target import SaveTarget

    gate = threading.Event()
    real = SaveTarget.write_items

    def gated(self: Any, *args: Any) -> Any:
        gate.wait(wait_s)
        return real(self, *args)

    monkeypatch.setattr(SaveTarget, "write_items", gated)
    return gate
