"""What ``bench_async.py``'s phases measure with (rank side).

* Memory: VmRSS / VmHWM from ``/proc/self/status``; :func:`reset_hwm` resets the
  high-water mark (Linux >= 4.0), :class:`RssSampler` samples RSS when it cannot;
  :func:`malloc_trim` and :func:`settle_dcp_threads` make RSS after a save live memory.
* :func:`instrument_shardckpt`: benchmark-only wrappers that split shardckpt's stall
  into planning and staging.
* :func:`probe_cpu_options`: DCP's CUDA-oriented staging options, tried on a tiny state.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "RssSampler",
    "hwm_bytes",
    "instrument_shardckpt",
    "malloc_trim",
    "probe_cpu_options",
    "reset_hwm",
    "rss_bytes",
    "settle_dcp_threads",
]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def hwm_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so RSS after a save is live memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def settle_dcp_threads(timeout: float = 10.0) -> None:
    """DCP's per-save executor thread drops the staged copy just after the future is done."""
    import threading

    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t.name.startswith("AsyncCheckpointExecutor"):
            t.join(max(0.0, deadline - time.monotonic()))


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Fallback when VmHWM cannot be reset: sample VmRSS every ~2 ms in a thread."""

    def __init__(self) -> None:
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(0.002)

    def __enter__(self) -> RssSampler:
        self.peak = rss_bytes()
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def instrument_shardckpt() -> dict[str, float] | None:
    """Time shardckpt's planning and staging inside async_save (benchmark-only wrappers).

    Returns the accumulator dict, or None if the internals moved (breakdown skipped).
    """
    try:
        from shardckpt.engine import async_save as _async
        from shardckpt.engine import staging
    except ImportError:
        return None
    acc = {"plan": 0.0, "stage": 0.0}
    if not all(
        hasattr(o, n)
        for o, n in (
            (_async, "plan_save"),
            (staging.StagingPool, "stage"),
            (staging.SlabStream, "produce"),
        )
    ):
        return None

    def wrap(fn: Callable[..., Any], slot: str) -> Callable[..., Any]:
        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[slot] += time.perf_counter() - t0

        return timed

    _async.plan_save = wrap(_async.plan_save, "plan")
    staging.StagingPool.stage = wrap(staging.StagingPool.stage, "stage")
    staging.SlabStream.produce = wrap(staging.SlabStream.produce, "stage")
    return acc


def probe_cpu_options(dcp_pg: Any, root: str, rank: int) -> dict[str, str]:
    """Try DCP's CUDA-oriented staging options on a tiny state; report what happens."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.staging import (
        BlockingAsyncStager,
        DefaultStager,
        StagingOptions,
    )

    tiny = {f"t{rank}": torch.ones(16)}
    probes: dict[str, Callable[[str], Any]] = {
        "FileSystemWriter(cache_staged_state_dict=True)": lambda p: dcp.async_save(
            tiny,
            storage_writer=FileSystemWriter(p, sync_files=True, cache_staged_state_dict=True),
            process_group=dcp_pg,
        ),
        "BlockingAsyncStager(cache_staged_state_dict=True)": lambda p: dcp.async_save(
            tiny,
            storage_writer=FileSystemWriter(p),
            async_stager=BlockingAsyncStager(cache_staged_state_dict=True),
            process_group=dcp_pg,
        ),
        "DefaultStager(StagingOptions()) [pinned+shared+async+non_blocking]": lambda p: (
            dcp.async_save(
                tiny,
                storage_writer=FileSystemWriter(p),
                async_stager=DefaultStager(StagingOptions()),
                process_group=dcp_pg,
            )
        ),
    }
    out = {}
    for i, (name, fn) in enumerate(probes.items()):
        path = os.path.join(root, f"probe{i}")
        dist.barrier()
        try:
            r = fn(path)
            fut = getattr(r, "upload_completion", r)
            fut.result()
            out[name] = "works"
        except BaseException as e:  # noqa: BLE001 - reported
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            out[name] = f"fails: {type(e).__name__}: {msg[:120]}"
        dist.barrier()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
    # both ranks must agree, or the group is left in a mismatched state
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, out)
    return {k: " | ".join(sorted({e[k] for e in every})) for k in out}
