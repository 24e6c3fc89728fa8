"""Type stub for the C++ extension ``shardckpt._crc32c`` (csrc/crc32c.cpp)."""

from typing_extensions import Buffer

def crc32c(data: Buffer, value: int = 0) -> int:
    """CRC32C of a C-contiguous buffer, continuing from a previous CRC ``value``.

    Raises BufferError for non-contiguous buffers, TypeError for non-buffers,
    ValueError/OverflowError if ``value`` is outside ``range(2**32)``.
    """

def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC32C of A + B given crc32c(A), crc32c(B) and len(B), in O(log len2)."""

def implementation() -> str:
    """Kernel crc32c() dispatches to: "vpclmulqdq", "pclmulqdq+sse4.2", "sse4.2" or "table"."""

def available_implementations() -> list[str]:
    """Kernels usable on this CPU, in dispatch preference order."""

def _crc32c_impl(name: str, data: Buffer, value: int = 0) -> int:
    """Testing hook: crc32c() through the named kernel (ValueError if unsupported)."""
