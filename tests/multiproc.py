"""Run a test body in N real processes joined by a gloo process group.

Uses torch.multiprocessing's own process launcher (spawn). The parent hosts the
rendezvous TCPStore on a free loopback port (port 0, so parallel xdist workers
never collide) and keeps it alive until every worker is gone: no worker's
teardown can pull the store from under another. A per-call timeout kills every
worker, so a hang fails the test instead of the run.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_multiprocess"]


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple[Any, ...]) -> None:
    import torch

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    fn(rank, world_size, *args)  # an exception propagates to the spawn wrapper, which reports it
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter finalization: C++ static destructors racing library threads
    # (seen: "terminate called without an active exception" -> SIGABRT after the
    # body had passed) are not what a test is about. Output is flushed first.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_multiprocess(fn: Callable[..., Any], nproc: int, *args: Any, timeout: float = 120.0) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``nproc`` gloo ranks; re-raise any worker failure.

    ``fn`` must be a module-level function (it is pickled into spawned workers).
    """
    store = dist.TCPStore("127.0.0.1", 0, nproc, is_master=True, wait_for_workers=False)
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        ctx = mp.start_processes(
            _entry, args=(fn, nproc, store.port, args), nprocs=nproc, join=False, start_method="spawn"
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
        del store  # only now: every worker is gone
