"""Tunables in one place, with environment overrides and a context manager.

Tests shrink ``chunk_bytes`` so tiny tensors exercise the chunked paths.

Every call (a save, a load, a verify) takes a snapshot with ``get()`` in the
caller's thread and passes it down: a ``SaveRequest`` carries it, storages opened
for the call hold it (``Storage.knobs``), collectives take their timeout from it.
No worker thread reads ``get()``, so ``override()`` around ``async_save`` governs
its background part too. ``override`` applies to the thread that enters it (and
the calls that thread starts): two threads overriding at once never see each
other's values.
"""

from __future__ import annotations

import contextlib
import os
import threading
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


#: Knobs that may be 0 (0 turns writeback hints off, or retries without delay).
_ZERO_OK = {"writeback_bytes", "retry_base_ms"}
#: Knobs that take one of a few words instead of a number.
_CHOICES: dict[str, tuple[str, ...]] = {"shared_reads": ("auto", "on", "off")}


def _env_choice(name: str, default: str) -> str:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    choices = _CHOICES[name.removeprefix("SHARDCKPT_").lower()]
    if raw.lower() not in choices:
        raise ValueError(f"environment variable {name}={raw!r} must be one of {list(choices)}")
    return raw.lower()


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
    #: Object stores: a rank starts a new shard object once the current one holds this
    #: many bytes (at a tensor boundary): many whole objects move in parallel.
    object_bytes: int = 32 << 20
    #: Object stores: size of one multipart-upload part (S3 needs >= 5 MiB but the last).
    part_bytes: int = 32 << 20
    #: Object stores: parts of one shard file uploaded at once (memory: about this + 1 parts).
    upload_concurrency: int = 4
    #: Object stores: one read is split into ranged GETs of this size, fetched concurrently.
    read_part_bytes: int = 8 << 20
    #: Object stores: ranged GETs of one read in flight at once.
    read_concurrency: int = 8
    #: Remote backends: attempts per request on transient errors (5xx, throttling, resets).
    retry_attempts: int = 8
    #: Remote backends: first backoff delay in milliseconds (doubles per attempt, full jitter).
    retry_base_ms: int = 100
    #: Remote backends: give up retrying one request after this many seconds in total.
    retry_max_seconds: int = 120
    #: Multi-rank: longest any collective of shardckpt waits for a peer, in seconds
    #: (gloo groups). A rank that died or is stuck then surfaces as the step's typed
    #: error on the others, instead of torch's 30-minute default. It must exceed the
    #: longest time one rank can spend writing or reading its share beyond the others.
    collective_timeout_s: int = 600
    #: Multi-rank loads: a replicated piece (DDP replicas, ``Replicate()`` placements) is
    #: read from storage by one rank and sent to the others over the process group.
    #: ``"auto"``: on remote backends (storage slower than the interconnect), not on
    #: local ones; ``"on"``: on every backend; ``"off"``: every rank reads all it loads.
    shared_reads: str = "auto"

    @staticmethod
    def from_env() -> Knobs:
        """The defaults, each overridden by its ``SHARDCKPT_<NAME>`` environment variable."""
        d = Knobs()
        values: dict[str, int | str] = {}
        for f in fields(Knobs):
            env, default = f"SHARDCKPT_{f.name.upper()}", getattr(d, f.name)
            values[f.name] = (_env_choice(env, default) if f.name in _CHOICES
                              else _env_int(env, default, allow_zero=f.name in _ZERO_OK))
        return Knobs(**values)  # type: ignore[arg-type]


_defaults: Knobs = Knobs.from_env()
_local = threading.local()


def get() -> Knobs:
    """The knobs in force in this thread now: its innermost ``override``, else the
    process defaults (``SHARDCKPT_*`` environment variables read at import)."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else _defaults


def _validated(changes: dict[str, int | str]) -> None:
    names = {f.name for f in fields(Knobs)}
    unknown = set(changes) - names
    if unknown:
        raise TypeError(f"unknown knob(s): {sorted(unknown)}; known: {sorted(names)}")
    for name, value in changes.items():
        if name in _CHOICES:
            if value not in _CHOICES[name]:
                raise ValueError(f"knob {name} must be one of {list(_CHOICES[name])}, got {value!r}")
            continue
        if not isinstance(value, int) or value < 0 or (value == 0 and name not in _ZERO_OK):
            raise ValueError(f"knob {name} must be a positive int, got {value!r}")


@contextlib.contextmanager
def override(**changes: int | str) -> Iterator[Knobs]:
    """Change knobs for this thread while the block runs:
    ``with knobs.override(chunk_bytes=64): ...``. Calls made inside take the changed
    values with them to their own threads."""
    _validated(changes)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    snapshot = replace(get(), **changes)
    stack.append(snapshot)
    try:
        yield snapshot
    finally:
        stack.pop()
