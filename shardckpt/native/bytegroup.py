"""Byte grouping for the compression codec, with a numpy fallback.

Byte grouping splits ``width``-byte elements into ``width`` planes (plane k =
byte k of every element, in memory order), so that a float tensor's exponent
bytes, which compress well, are separated from its mantissa bytes, which do
not. The transform sits on the hot path of compressed save and load, so the
real work is done by the C++ extension ``shardckpt.native._bytegroup``
(``csrc/bytegroup.cpp``: AVX-512 VBMI / AVX2 kernels chosen at import time,
GIL released on large buffers, tens of GB/s on cache-resident chunks).

If the extension cannot be imported (a source checkout never built, an
unusual platform) the same functions are provided by numpy transposes, which
give identical bytes at a fraction of the speed; a ``RuntimeWarning`` says so
once, on first use. Set ``SHARDCKPT_FORCE_NUMPY_BYTEGROUP=1`` to force the
fallback (useful for testing it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .loader import Native, as_u8

__all__ = ["group", "ungroup", "ungroup_planes", "implementation", "is_compiled"]

_FORCE_ENV = "SHARDCKPT_FORCE_NUMPY_BYTEGROUP"
_WIDTHS = (2, 4, 8)


# ---------------------------------------------------------------------------
# numpy reference implementation (always available; tests call it directly).
# ---------------------------------------------------------------------------


def _check(src: np.ndarray, dst: np.ndarray, width: int, fname: str) -> None:
    if width not in _WIDTHS:
        raise ValueError(f"width must be 2, 4 or 8, not {width}")
    if len(src) != len(dst) or len(src) % width:
        raise ValueError(
            f"{fname}(): src and dst must have the same length, a multiple of width "
            f"(len(src)={len(src)}, len(dst)={len(dst)}, width={width})"
        )
    if np.may_share_memory(src, dst):  # bounds overlap == overlap for 1-D contiguous
        raise ValueError(f"{fname}(): src and dst must not overlap")


def _numpy_group(src: Any, dst: Any, width: int) -> None:
    """``dst[k*n + i] = src[i*width + k]`` with numpy (same contract as the extension)."""
    s, d = as_u8(src, False, "src"), as_u8(dst, True, "dst")
    _check(s, d, width, "group")
    d.reshape(width, -1)[...] = s.reshape(-1, width).T


def _numpy_ungroup(src: Any, dst: Any, width: int) -> None:
    """Inverse of :func:`_numpy_group`."""
    s, d = as_u8(src, False, "src"), as_u8(dst, True, "dst")
    _check(s, d, width, "ungroup")
    d.reshape(-1, width)[...] = s.reshape(width, -1).T


def _numpy_ungroup_planes(planes: Sequence[Any], dst: Any) -> None:
    """Inverse of :func:`_numpy_group` from separate plane buffers."""
    width = len(planes)
    if width not in _WIDTHS:
        raise ValueError(f"ungroup_planes(): need 2, 4 or 8 planes, got {width}")
    d = as_u8(dst, True, "dst")
    ps = [as_u8(p, False, "each plane") for p in planes]
    if any(len(p) * width != len(d) for p in ps):
        raise ValueError("ungroup_planes(): every plane must be len(dst) // len(planes) bytes long")
    if any(np.may_share_memory(p, d) for p in ps):
        raise ValueError("ungroup_planes(): planes must not overlap dst")
    view = d.reshape(-1, width)
    for k, p in enumerate(ps):
        view[:, k] = p


# ---------------------------------------------------------------------------
# Selection between the extension and the fallback.
# ---------------------------------------------------------------------------

_native = Native("_bytegroup", _FORCE_ENV, fallback="numpy byte-grouping fallback", label="numpy",
                 consequence="compressed save/load will be slower than with the extension")
group, ungroup, ungroup_planes = _native.bind(group=_numpy_group, ungroup=_numpy_ungroup,
                                               ungroup_planes=_numpy_ungroup_planes)
implementation, is_compiled = _native.implementation, _native.is_compiled
