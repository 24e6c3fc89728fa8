"""The compiled kernels (C++ in ``csrc/``, no libtorch) and their warned fallbacks.

Lives here: one loader (``loader.Native``) and one module per kernel family:
``crc32c`` (checksums), ``bytegroup`` (the codec's byte planes), ``copy`` (staging
copies). Each falls back to a numpy/Python implementation that warns once.
Imports nothing from shardckpt outside this folder.

>>> shardckpt.native.implementation()
{'crc32c': 'compiled:vpclmulqdq', 'bytegroup': 'compiled:avx512vbmi', 'copy': 'compiled:avx512'}
"""

from __future__ import annotations

from . import bytegroup, copy, crc32c

__all__ = ["implementation", "is_compiled"]


def implementation() -> dict[str, str]:
    """The active implementation of each kernel family (``"compiled:<isa>"`` or the fallback's name)."""
    return {"crc32c": crc32c.implementation(), "bytegroup": bytegroup.implementation(),
            "copy": copy.implementation()}


def is_compiled() -> bool:
    """True when every kernel family runs compiled code."""
    return crc32c.is_compiled() and bytegroup.is_compiled() and copy.is_compiled()
