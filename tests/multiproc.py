"""Run a test body in N real processes joined by a gloo process group.

Uses torch.multiprocessing's own process launcher (spawn) and a FileStore
rendezvous, so tests running in parallel under xdist never fight over ports.
A per-call timeout kills every worker, so a hang fails the test instead of the run.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_multiprocess"]


def _entry(rank: int, fn: Callable[..., Any], world_size: int, store_path: str, args: tuple[Any, ...]) -> None:
    import torch

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size
    )
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_multiprocess(fn: Callable[..., Any], nproc: int, *args: Any, timeout: float = 120.0) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``nproc`` gloo ranks; re-raise any worker failure.

    ``fn`` must be a module-level function (it is pickled into spawned workers).
    """
    fd, store_path = tempfile.mkstemp(prefix="shardckpt-store-")
    os.close(fd)
    os.unlink(store_path)  # FileStore creates it; a stale file would confuse rendezvous
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        ctx = mp.start_processes(
            _entry, args=(fn, nproc, store_path, args), nprocs=nproc, join=False, start_method="spawn"
        )
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{fn.__name__} did not finish in {timeout:.0f}s on {nproc} ranks")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        for p in ctx.processes:
            p.join(5)
        if os.path.exists(store_path):
            os.unlink(store_path)
