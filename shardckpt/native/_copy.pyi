"""Type stub for the C++ extension ``shardckpt._copy`` (csrc/copy.cpp)."""

from collections.abc import Sequence

from typing_extensions import Buffer

def copy(dst: Buffer, src: Buffer, threads: int | None = 1, impl: str | None = None) -> None:
    """Copy the C-contiguous buffer ``src`` into the writable C-contiguous buffer ``dst``.

    Same length, not overlapping (ValueError otherwise); GIL released above 64 KiB;
    split over up to ``threads`` threads (1..64; at least 4 MiB each). ``impl`` names
    a kernel (testing hook); None uses the best one for this CPU.
    """

def copy_many(
    dsts: Sequence[Buffer], srcs: Sequence[Buffer], threads: int | None = 1, impl: str | None = None
) -> None:
    """``copy(dsts[i], srcs[i])`` for every i in one call: every pair is checked before
    any byte is copied, and the GIL is released once for all of them."""

def implementation() -> str:
    """Kernel copy()/copy_many() dispatch to: "avx512", "avx2" or "memcpy"."""

def available_implementations() -> list[str]:
    """Kernels usable on this CPU, in dispatch preference order."""
