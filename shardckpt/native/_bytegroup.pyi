"""Type stub for the C++ extension ``shardckpt._bytegroup`` (csrc/bytegroup.cpp)."""

from collections.abc import Sequence

from typing_extensions import Buffer

def group(src: Buffer, dst: Buffer, width: int, impl: str | None = None) -> None:
    """Split ``width``-byte elements of ``src`` into ``width`` byte planes in ``dst``.

    ``dst[k*n + i] = src[i*width + k]`` for ``n = len(src) // width``. ``width`` is 2, 4
    or 8; both buffers C-contiguous, equal length (a multiple of ``width``), ``dst``
    writable and not overlapping ``src`` (ValueError otherwise). ``impl`` names a kernel
    set (testing hook); None uses the best one for this CPU.
    """

def ungroup(src: Buffer, dst: Buffer, width: int, impl: str | None = None) -> None:
    """Inverse of :func:`group`: interleave the ``width`` planes of ``src`` into ``dst``."""

def ungroup_planes(planes: Sequence[Buffer], dst: Buffer, impl: str | None = None) -> None:
    """Inverse of :func:`group` with 2, 4 or 8 separate plane buffers of ``len(dst) // len(planes)`` bytes."""

def implementation() -> str:
    """Kernel set the functions dispatch to: "avx512vbmi", "avx2" or "scalar"."""

def available_implementations() -> list[str]:
    """Kernel sets usable on this CPU, in dispatch preference order."""
