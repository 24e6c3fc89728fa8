"""Tunables in one place, with environment overrides and a context manager.

Tests shrink ``chunk_bytes`` so tiny tensors exercise the chunked paths.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

__all__ = ["Knobs", "get", "override"]


def _env_int(name: str, default: int, allow_zero: bool = False) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw, 0)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"environment variable {name}={raw!r} must be positive")
    return value


@dataclass(frozen=True)
class Knobs:
    #: Size of one stored chunk (before encoding). Each chunk has its own CRC32C,
    #: and a resharded load reads only the chunks it needs.
    chunk_bytes: int = 4 << 20
    #: Threads per rank for reading/writing and checksumming (I/O and CRC release the GIL).
    io_threads: int = 2
    #: Largest contiguous byte range one read request brings into memory at once.
    max_read_bytes: int = 64 << 20
    #: Local writes: start kernel writeback every this many bytes (0: only at fsync).
    writeback_bytes: int = 8 << 20

    @staticmethod
    def from_env() -> Knobs:
        d = Knobs()
        return Knobs(
            chunk_bytes=_env_int("SHARDCKPT_CHUNK_BYTES", d.chunk_bytes),
            io_threads=_env_int("SHARDCKPT_IO_THREADS", d.io_threads),
            max_read_bytes=_env_int("SHARDCKPT_MAX_READ_BYTES", d.max_read_bytes),
            writeback_bytes=_env_int("SHARDCKPT_WRITEBACK_BYTES", d.writeback_bytes, allow_zero=True),
        )


_ZERO_OK = {"writeback_bytes"}
_current: Knobs = Knobs.from_env()


def get() -> Knobs:
    """The knobs in force now."""
    return _current


@contextlib.contextmanager
def override(**changes: int) -> Iterator[Knobs]:
    """Temporarily change knobs: ``with knobs.override(chunk_bytes=64): ...``."""
    global _current
    names = {f.name for f in fields(Knobs)}
    unknown = set(changes) - names
    if unknown:
        raise TypeError(f"unknown knob(s): {sorted(unknown)}; known: {sorted(names)}")
    for name, value in changes.items():
        if not isinstance(value, int) or value < 0 or (value == 0 and name not in _ZERO_OK):
            raise ValueError(f"knob {name} must be a positive int, got {value!r}")
    previous = _current
    _current = replace(previous, **changes)
    try:
        yield _current
    finally:
        _current = previous
