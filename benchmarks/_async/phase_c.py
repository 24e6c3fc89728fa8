"""Phase C of ``bench_async.py`` (rank side): the stall against the memory-copy floor.

For each ``--sizes`` GiB (the state of ``bench_core.py``): one warm-up
shardckpt.async_save, then ``--copy-repeats`` rounds of one timed save and three
copies of this rank's shard into reused, pre-faulted buffers (:func:`floor_copies`),
both ranks starting each together, the order alternating per round.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Callable
from typing import Any

from benchmarks._async.measure import instrument_shardckpt, malloc_trim
from benchmarks._common import rank0_clear, rank0_logger
from benchmarks._state import make_state, rows_for, source_shard

__all__ = ["floor_copies", "phase_c"]


def floor_copies(src: list[Any], dst: list[Any]) -> dict[str, Callable[[], None]]:
    """Copies of this rank's shard into reused, pre-faulted buffers, without shardckpt.

    memcpy  libc memcpy per tensor (ctypes.memmove on the data pointers): the floor
    kernel  shardckpt's staging kernel alone (``_copy_shim.copy_many``, no Python
            per item, no planning): what staging would cost with zero overhead
    copy_   torch.Tensor.copy_ per tensor (what staging used before the extension)
    """
    import ctypes

    import torch

    from shardckpt.engine.staging import copy_threads
    from shardckpt.native import copy as _copy_shim

    ptrs = [(d.data_ptr(), t.data_ptr(), d.numel()) for d, t in zip(dst, src)]
    dn = [d.numpy() for d in dst]
    sn = [t.reshape(-1).view(torch.uint8).numpy() for t in src]
    flat = [(d.view(t.dtype).view(t.shape), t) for d, t in zip(dst, src)]

    def memcpy() -> None:
        for d, s, n in ptrs:
            ctypes.memmove(d, s, n)

    def kernel() -> None:
        _copy_shim.copy_many(dn, sn, threads=copy_threads())

    def torch_copy() -> None:
        for d, t in flat:
            d.copy_(t)

    return {"memcpy": memcpy, "kernel": kernel, "copy_": torch_copy}


def _timed_save(sd: dict[str, Any], path: str, breakdown: dict[str, float] | None) -> dict[str, float]:
    """One shardckpt.async_save, both ranks starting together: its stall (and split),
    then the commit is awaited and the checkpoint removed before anything else runs."""
    import torch.distributed as dist

    import shardckpt

    if breakdown is not None:
        breakdown.update(plan=0.0, stage=0.0)
    dist.barrier()
    t0 = time.perf_counter()
    h = shardckpt.async_save(sd, path)
    rec = {"stall": time.perf_counter() - t0}
    h.result()
    if breakdown is not None:
        rec.update(plan=breakdown["plan"], stage=breakdown["stage"])
    rank0_clear(path)  # no dirty pages of this save compete with the next copy
    dist.barrier()
    return rec


def _one_size(gib: float, mesh: Any, root: str, copy_repeats: int,
              breakdown: dict[str, float] | None, log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """One state size: the first save, then ``copy_repeats`` rounds of save and floors."""
    import torch
    import torch.distributed as dist

    rows = rows_for(gib)
    sd = make_state(mesh, rows, lambda i, size, r: source_shard(i, rows, r))
    local = [t.to_local() for t in sd.values()]
    my_bytes = sum(t.numel() * t.element_size() for t in local)
    dst = [torch.empty(t.numel() * t.element_size(), dtype=torch.uint8).zero_() for t in local]
    floors = floor_copies(local, dst)
    records: list[dict[str, Any]] = []
    # the first save allocates and faults in the staging pool
    first = _timed_save(sd, os.path.join(root, f"C-{gib}-first"), breakdown)
    for rnd in range(copy_repeats):
        rec: dict[str, Any] = {"round": rnd}
        # alternate the order, so drift on a shared machine hits both sides alike
        order = ["save", *floors] if rnd % 2 == 0 else [*floors, "save"]
        for what in order:
            gc.collect()
            if what == "save":
                path = os.path.join(root, f"C-{gib}-r{rnd}")
                rec.update(_timed_save(sd, path, breakdown))
            else:
                dist.barrier()
                t0 = time.perf_counter()
                floors[what]()
                rec[what] = time.perf_counter() - t0
        records.append(rec)
        log(
            f"{gib:g} GiB round {rnd}: stall {rec['stall'] * 1e3:6.1f} ms, memcpy "
            f"{rec['memcpy'] * 1e3:6.1f} ms, kernel {rec['kernel'] * 1e3:6.1f} ms, copy_ "
            f"{rec['copy_'] * 1e3:6.1f} ms"
        )
    return {"gib": gib, "my_bytes": my_bytes, "first": first, "records": records}


def phase_c(args: argparse.Namespace) -> dict[str, Any]:
    """Per size: the 2nd+ async_save stall and the floors, interleaved round by round."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import shardckpt
    from shardckpt.engine.staging import copy_threads
    from shardckpt.native import copy as _copy_shim

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    log = rank0_logger(f"phase C | {world} ranks")
    breakdown = instrument_shardckpt()
    log(f"copy backend {_copy_shim.implementation()}, {copy_threads()} copy thread(s) per rank")
    sizes: list[dict[str, Any]] = []
    for gib in args.sizes:
        sizes.append(_one_size(gib, mesh, args.dir, args.copy_repeats, breakdown, log))
        gc.collect()  # the size's state and buffers are gone: hand their memory back
        malloc_trim()
    shardckpt.close()
    return {
        "sizes": sizes,
        "copy_impl": _copy_shim.implementation(),
        "copy_threads": copy_threads(),
        "breakdown": breakdown is not None,
    }
