#!/usr/bin/env python
"""Async-save benchmark: shardckpt.async_save vs torch.distributed.checkpoint.async_save.

    python benchmarks/bench_async.py [--phases CST] [--sizes 0.25,0.5,1] [--copy-repeats 7]
                                     [--gib 2] [--repeats 3] [--steps 60] [--every 10]
                                     [--train-rounds 2] [--train-mode windows|runs]
                                     [--dir /tmp/x] [--profile] [--keep] [--json PATH]

Three phases, each a separate ``python -m torch.distributed.run --standalone``
(torchrun) launch of this same file with ``--phase``; rank 0 writes the results
of every rank as JSON that this driver reads and reports. ``--json PATH`` also
writes a summary: ``{"rows": [...], "stall_2nd_s": {...}, "training": {...},
"targets": [...], "machine", "date", ...}``, one row per phase-C size:
``{"size_bytes" (whole state), "rank_bytes", "ranks", "stall_s", "memcpy_s",
"ratio", "paired_ratio", "first_stall_s", "kernel_s", "torch_copy_s", "plan_s",
"stage_s", "stalls_s", "memcpys_s", "copy_impl", "copy_threads"}``.

C (2 ranks)  the stall against the memory-copy floor (issue 12 section 3). For
             each ``--sizes`` GiB (whole state, the state of ``bench_core.py``):
             one warm-up shardckpt.async_save (allocates the staging pool), then
             ``--copy-repeats`` rounds of: one async_save (stall timed, commit
             awaited, directory removed, os.sync) and three copies of this rank's
             shard into reused, pre-faulted buffers: libc memcpy per tensor (the
             floor), shardckpt's copy kernel alone, torch.Tensor.copy_. Both ranks
             start each together (barrier); the order alternates per round (save
             first, then floors first), so drift hits both sides alike. Per round
             the max over ranks; reported: medians, ratio = median stall / median
             memcpy, paired = median of the per-round ratios, and the stall split
             into planning and staging. Target: ratio <= 1.25.

S (2 ranks)  stall / commit / memory. The state of ``bench_core.py``: ``--gib``
             GiB of fp32 in 16 DTensors ``Shard(0)`` on a 1-D CPU mesh of 2 gloo
             ranks. ``--repeats`` rounds (>= 3); in each round every variant
             saves once to a fresh directory and waits for the durable commit
             before the next starts; the variants' order rotates from round to
             round. Variants:

               shardckpt         shardckpt.async_save (the default engine: reused
                                 staging pool)
               shardckpt-budget  its own shardckpt.AsyncCheckpointer, with
                                 staging_budget_bytes = 0.25 x this rank's shard
               dcp               dcp.async_save(storage_writer=FileSystemWriter(
                                 sync_files=True)): the writer is DCP's stager
                                 (BlockingAsyncStager, no cache: a fresh CPU copy
                                 of the state per save)
               dcp-cached        the same with async_stager=DefaultStager(
                                 StagingOptions(False, False, False, False)), one
                                 instance kept across saves: it caches its CPU
                                 copies by source storage, i.e. reused buffers
               dcp-bgstage       DefaultStager(StagingOptions(False, False, True,
                                 False)), kept across saves: cached and staged in
                                 a background thread; async_save returns an
                                 AsyncSaveResponse before staging is done

             The options that need CUDA (pinned memory: FileSystemWriter /
             BlockingAsyncStager(cache_staged_state_dict=True); non-blocking
             copies: DefaultStager's defaults) are tried once on a tiny state and
             reported as unavailable with their error.

             DCP's background save runs on a dedicated gloo group (DCP's own
             advice for async save; shardckpt makes its own). Per save and rank:
               stall   call -> return; for dcp-bgstage call -> staging done
                       (training must not change parameters before then), the
                       time the call itself returns is reported too
               commit  call -> result() / future done (after the manifest /
                       metadata is committed on all ranks: both libraries
                       finish on the coordinator, then release every rank)
               memory  VmHWM is reset (``/proc/self/clear_refs`` 5) right before
                       the call and read after the commit. The extra RSS of a
                       save = VmHWM - VmRSS before the call; memory a variant
                       keeps between saves (its staging pool / cache) is added
                       back, so "peak extra RSS" is the most memory the variant
                       ever held above a process that never saved with it.
                       Before "held" is read, DCP's per-save executor thread is
                       joined (it drops the staged copy just after the future
                       completes) and freed heap is handed back (malloc_trim).
             Reported: 1st-save stall, median of the 2nd+ stalls (max over
             ranks, per save), median commit time, peak extra RSS (max over
             ranks), staging GB/s per rank = rank's shard bytes / its median 2nd+
             stall (lowest rank shown). For shardckpt the stall is also split
             into planning (collective, on its own gloo group) and staging.

T (2 ranks)  training loop. An MLP (~25M parameters, batch 32, fused Adam: a
             ~300 MB checkpoint, replicated, so each rank writes about half;
             ~0.25-0.35 s per step here) under DDP (gloo, the default group),
             checkpointing get_state_dict(model, optim) every ``--every`` steps,
             for: none, shardckpt.async_save, shardckpt.save, DCP async_save
             (default stager, its own gloo group so its background collectives
             cannot meet DDP's; the previous future is waited for before the next
             async_save, as DCP asks). Two schedules:

             windows (default)  the unit is one checkpoint interval as a long run
                   sees it: the save call, ``--every`` steps (the background write
                   overlaps them), then the wait for that save to finish, which is
                   exactly what the next call of a continuous run would wait for;
                   all timed. ``--steps / --every`` intervals per round,
                   ``--train-rounds`` rounds; the configs' intervals are
                   interleaved round-robin (order rotated), so all of them see the
                   same background load of a shared machine. Step time = median
                   interval / ``--every``. Every save is finished at the end of
                   its interval, so nothing is pending when the phase ends.
             runs  (``--train-mode runs``) each config trains ``--steps`` steps in
                   one run, runs interleaved (order rotated per round). A priming
                   checkpoint is started just before the clock starts (call not
                   timed), so each window of ``--every`` steps holds one save call
                   and overlaps one background write; after the last step the
                   pending save's completion is awaited and reported, not counted.
                   Mean step time = timed loop / steps; medians over rounds. On a
                   shared 2-core machine, load from other processes changes over
                   the ~20 s of a run, which is why windows is the default.

             Both count everything the loop waits for: save calls, waits for
             the previous save, CPU contention from background writers.
             Slowdown = (t - t_none) / t_none.

Targets (issue 12 section 3): phase C 2nd+ stall <= 1.25x the memcpy floor.
Targets (issue 3): 2nd+ stall <= 0.2x DCP async_save's (default stager);
staging >= 8 GB/s per rank; budgeted peak extra RSS <= budget + 64 MiB; training
slowdown of shardckpt async <= 1/3 of DCP async's.

``--profile``: after phase S, rank 0 runs one more shardckpt.async_save under
cProfile and the report prints where its stall went.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
for _p in (_REPO, _HERE):  # benchmark the checkout this file lives in; bench_core's state
    if _p not in sys.path:
        sys.path.insert(0, _p)

from benchmarks._state import N_TENSORS, global_bytes, rows_for  # noqa: E402
from benchmarks._state import make_state as _make_state  # noqa: E402
from benchmarks._state import source_shard as _source_shard  # noqa: E402

PHASES = {"C": 2, "S": 2, "T": 2}
FLOOR_RATIO_TARGET = 1.25  # issue 12 section 3: 2nd+ stall <= 1.25x plain memcpy
S_VARIANTS = ("shardckpt", "shardckpt-budget", "dcp", "dcp-cached", "dcp-bgstage")
T_CONFIGS = ("none", "shardckpt-async", "shardckpt-sync", "dcp-async")
BUDGET_FRACTION = 0.25
RSS_SLACK_MIB = 64
# MLP for phase T: D_IN -> H -> H -> H -> D_IN
D_IN, HIDDEN, BATCH = 1024, 3072, 32
MiB = 1 << 20


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Worker helpers
# ---------------------------------------------------------------------------


def _quiet_warnings() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed.checkpoint")
    warnings.filterwarnings("ignore", message=".*[Pp]in.*memory.*")


def _instrument_shardckpt() -> dict[str, float] | None:
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


def _probe_cpu_options(dcp_pg: Any, root: str, rank: int) -> dict[str, str]:
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


# ---------------------------------------------------------------------------
# Phase S: stall, commit time, memory
# ---------------------------------------------------------------------------


def phase_s(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.device_mesh import init_device_mesh

    import shardckpt

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    rows = rows_for(args.gib)
    root = args.dir
    dcp_pg = dist.new_group(backend="gloo")

    def log(msg: str) -> None:
        if rank == 0:
            print(f"[phase S | {world} ranks] {msg}", file=sys.stderr, flush=True)

    probes = _probe_cpu_options(dcp_pg, root, rank)
    for k, v in probes.items():
        log(f"probe {k}: {v}")

    t_build = time.perf_counter()
    src = _make_state(mesh, rows, lambda i, size, r: _source_shard(i, rows, r))
    my_bytes = sum(t.to_local().numel() * t.to_local().element_size() for t in src.values())
    budget = int(BUDGET_FRACTION * my_bytes)
    log(
        f"built source state ({time.perf_counter() - t_build:.1f}s); {my_bytes / MiB:.0f} MiB per rank"
    )

    # reference: copy this rank's shard into a reused, pre-faulted buffer, both ranks at once
    ref = [torch.empty_like(t.to_local()).zero_() for t in src.values()]
    ref_times = []
    for _ in range(3):
        dist.barrier()
        t0 = time.perf_counter()
        for d, t in zip(ref, src.values()):
            d.copy_(t.to_local())
        ref_times.append(time.perf_counter() - t0)
    del ref
    malloc_trim()
    log(
        f"reference copy into reused buffers: {my_bytes / statistics.median(ref_times) / 1e9:.2f} GB/s"
    )

    breakdown = _instrument_shardckpt()
    budget_ckpt = shardckpt.AsyncCheckpointer()
    cached_stager = DefaultStager(StagingOptions(False, False, False, False))
    bg_stager = DefaultStager(StagingOptions(False, False, True, False))
    hwm_ok = reset_hwm()

    # variant -> fn(sd, path) -> (staging waiter or None, commit waiter, reported stall or None, return type)
    def start(
        variant: str, sd: dict[str, Any], path: str
    ) -> tuple[Callable[[], Any] | None, Callable[[], Any], float | None, str]:
        if variant == "shardckpt":
            h = shardckpt.async_save(sd, path)
            return None, h.result, h.stall_seconds, type(h).__name__
        if variant == "shardckpt-budget":
            h = budget_ckpt.async_save(sd, path, staging_budget_bytes=budget)
            return None, h.result, h.stall_seconds, type(h).__name__
        stager = {"dcp": None, "dcp-cached": cached_stager, "dcp-bgstage": bg_stager}[variant]
        kw = {} if stager is None else {"async_stager": stager}
        r = dcp.async_save(
            sd, storage_writer=FileSystemWriter(path, sync_files=True), process_group=dcp_pg, **kw
        )
        staging = getattr(r, "staging_completion", None)
        upload = getattr(r, "upload_completion", r)
        return (
            (staging.result if staging is not None else None),
            upload.result,
            None,
            type(r).__name__,
        )

    records: list[dict[str, Any]] = []
    for rnd in range(args.repeats):
        order = S_VARIANTS[rnd % len(S_VARIANTS) :] + S_VARIANTS[: rnd % len(S_VARIANTS)]
        for variant in order:
            path = os.path.join(root, f"S-{variant}-{rnd}")
            if rank == 0:
                shutil.rmtree(path, ignore_errors=True)
            gc.collect()
            malloc_trim()
            if breakdown is not None:
                breakdown.update(plan=0.0, stage=0.0)
            dist.barrier()
            rss0 = rss_bytes()
            reset_hwm()
            sampler = RssSampler() if not hwm_ok else None
            if sampler:
                sampler.__enter__()
            dist.barrier()
            t0 = time.perf_counter()
            wait_staged, wait_commit, reported, rtype = start(variant, src, path)
            t_ret = time.perf_counter() - t0
            if wait_staged is not None:
                wait_staged()
            t_staged = time.perf_counter() - t0
            wait_commit()
            t_commit = time.perf_counter() - t0
            if sampler:
                sampler.__exit__()
            peak = sampler.peak if sampler else hwm_bytes()
            settle_dcp_threads()
            gc.collect()
            malloc_trim()
            rss1 = rss_bytes()
            rec = {
                "variant": variant,
                "round": rnd,
                "returned": t_ret,
                "stall": t_staged,
                "commit": t_commit,
                "reported_stall": reported,
                "return_type": rtype,
                "rss_before": rss0,
                "peak": peak,
                "rss_after": rss1,
            }
            if breakdown is not None and variant.startswith("shardckpt"):
                rec["plan"], rec["stage"] = breakdown["plan"], breakdown["stage"]
            records.append(rec)
            dist.barrier()
            if rank == 0:
                shutil.rmtree(path, ignore_errors=True)
                os.sync()  # the next save starts with no dirty pages of this one
            log(
                f"round {rnd} {variant:16s} stall {t_staged:6.3f}s (returned {t_ret:6.3f}s)  commit {t_commit:6.3f}s  "
                f"peak +{(peak - rss0) / MiB:6.0f} MiB, held +{(rss1 - rss0) / MiB:6.0f} MiB"
            )

    profile_text = None
    if args.profile:
        import cProfile
        import io
        import pstats

        path = os.path.join(root, "S-profile")
        dist.barrier()
        prof = cProfile.Profile() if rank == 0 else None
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        h = shardckpt.async_save(src, path)
        if prof:
            prof.disable()
        stall = time.perf_counter() - t0
        h.result()
        dist.barrier()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
            s = io.StringIO()
            s.write(
                f"one steady-state shardckpt.async_save on rank 0: stall {stall:.3f}s (under cProfile)\n"
            )
            pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(22)
            profile_text = s.getvalue()

    shardckpt.close()
    budget_ckpt.close()
    cached_stager.close()
    bg_stager.close()
    return {
        "records": records,
        "my_bytes": my_bytes,
        "budget": budget,
        "ref_copy_s": statistics.median(ref_times),
        "probes": probes,
        "hwm_reset": hwm_ok,
        "breakdown": breakdown is not None,
        "profile": profile_text,
    }


# ---------------------------------------------------------------------------
# Phase C: the stall against the memory-copy floor
# ---------------------------------------------------------------------------


def _floor_copies(src: list[Any], dst: list[Any]) -> dict[str, Callable[[], None]]:
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


def _timed_save(
    sd: dict[str, Any], path: str, breakdown: dict[str, float] | None, rank: int
) -> dict[str, float]:
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
    dist.barrier()
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.sync()  # no dirty pages of this save compete with the next copy
    dist.barrier()
    return rec


def phase_c(args: argparse.Namespace) -> dict[str, Any]:
    """Per size: the 2nd+ async_save stall and the floors, interleaved round by round."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import shardckpt
    from shardckpt.engine.staging import copy_threads
    from shardckpt.native import copy as _copy_shim

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    root = args.dir

    def log(msg: str) -> None:
        if rank == 0:
            print(f"[phase C | {world} ranks] {msg}", file=sys.stderr, flush=True)

    breakdown = _instrument_shardckpt()
    log(f"copy backend {_copy_shim.implementation()}, {copy_threads()} copy thread(s) per rank")
    sizes: list[dict[str, Any]] = []
    for gib in args.sizes:
        rows = rows_for(gib)
        sd = _make_state(mesh, rows, lambda i, size, r, rows=rows: _source_shard(i, rows, r))
        local = [t.to_local() for t in sd.values()]
        my_bytes = sum(t.numel() * t.element_size() for t in local)
        dst = [torch.empty(t.numel() * t.element_size(), dtype=torch.uint8).zero_() for t in local]
        floors = _floor_copies(local, dst)
        records: list[dict[str, Any]] = []
        # the first save allocates and faults in the staging pool
        first = _timed_save(sd, os.path.join(root, f"C-{gib}-first"), breakdown, rank)
        for rnd in range(args.copy_repeats):
            rec: dict[str, Any] = {"round": rnd}
            # alternate the order, so drift on a shared machine hits both sides alike
            order = ["save", *floors] if rnd % 2 == 0 else [*floors, "save"]
            for what in order:
                gc.collect()
                if what == "save":
                    path = os.path.join(root, f"C-{gib}-r{rnd}")
                    rec.update(_timed_save(sd, path, breakdown, rank))
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
        sizes.append({"gib": gib, "my_bytes": my_bytes, "first": first, "records": records})
        del sd, local, dst, floors
        gc.collect()
        malloc_trim()
    shardckpt.close()
    return {
        "sizes": sizes,
        "copy_impl": _copy_shim.implementation(),
        "copy_threads": copy_threads(),
        "breakdown": breakdown is not None,
    }


# ---------------------------------------------------------------------------
# Phase T: training loop
# ---------------------------------------------------------------------------


def phase_t(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    import torch.nn.functional as F
    from torch import nn
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.nn.parallel import DistributedDataParallel as DDP

    import shardckpt

    rank, world = dist.get_rank(), dist.get_world_size()
    root = args.dir
    dcp_pg = dist.new_group(backend="gloo")

    def log(msg: str) -> None:
        if rank == 0:
            print(f"[phase T | {world} ranks] {msg}", file=sys.stderr, flush=True)

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(D_IN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, D_IN),
    )
    n_params = sum(p.numel() for p in model.parameters())
    ddp = DDP(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)  # foreach Adam: ~8x slower here
    g = torch.Generator().manual_seed(1000 + rank)
    batches = [
        (torch.randn(BATCH, D_IN, generator=g), torch.randn(BATCH, D_IN, generator=g))
        for _ in range(4)
    ]

    def train_step(s: int) -> None:
        x, y = batches[s % len(batches)]
        opt.zero_grad(set_to_none=True)
        F.mse_loss(ddp(x), y).backward()
        opt.step()

    def state() -> dict[str, Any]:
        msd, osd = get_state_dict(ddp, opt)
        return {"model": msd, "optim": osd}

    for s in range(3):  # warm-up; creates Adam's state before any checkpoint
        train_step(s)
    ckpt_bytes = sum(
        v.numel() * v.element_size()
        for part in state().values()
        for v in _leaves(part)
        if isinstance(v, torch.Tensor)
    )
    log(
        f"MLP {n_params / 1e6:.1f}M params, checkpoint {ckpt_bytes / MiB:.0f} MiB (model + Adam), batch {BATCH}"
    )

    seq = [0]

    def checkpoint(cfg: str, pending: Any, tag: str) -> Any:
        """Start (or do) one checkpoint as the training loop would; returns the new pending handle."""
        seq[0] += 1
        path = os.path.join(root, f"T-{cfg}-{tag}-{seq[0]}")
        sd = state()
        if cfg == "shardckpt-async":
            return shardckpt.async_save(sd, path)  # waits for the previous save itself
        if cfg == "shardckpt-sync":
            shardckpt.save(sd, path)
            return None
        if cfg == "dcp-async":
            if pending is not None:
                pending.result()
            r = dcp.async_save(
                sd, storage_writer=FileSystemWriter(path, sync_files=True), process_group=dcp_pg
            )
            return getattr(r, "upload_completion", r)
        raise ValueError(cfg)

    if args.train_mode == "windows":
        wins = _train_windows(args, rank, root, checkpoint, train_step, log)
        shardckpt.close()
        return {"windows": wins, "n_params": n_params, "ckpt_bytes": ckpt_bytes}

    runs: list[dict[str, Any]] = []
    for rnd in range(args.train_rounds):
        order = T_CONFIGS[rnd % len(T_CONFIGS) :] + T_CONFIGS[: rnd % len(T_CONFIGS)]
        for cfg in order:
            gc.collect()
            dist.barrier()
            pending = None
            if cfg != "none":  # priming checkpoint: its write overlaps the first window
                pending = checkpoint(cfg, None, f"r{rnd}")
            step_t: list[float] = []
            ckpt_t: list[float] = []
            t0 = time.perf_counter()
            for s in range(1, args.steps + 1):
                ts = time.perf_counter()
                train_step(s)
                if cfg != "none" and s % args.every == 0:
                    tc = time.perf_counter()
                    pending = checkpoint(cfg, pending, f"r{rnd}")
                    ckpt_t.append(time.perf_counter() - tc)
                step_t.append(time.perf_counter() - ts)
            loop = time.perf_counter() - t0
            tw = time.perf_counter()
            if pending is not None:
                pending.result()
            final_wait = time.perf_counter() - tw
            ckpt_steps = {
                s for s in range(1, args.steps + 1) if cfg != "none" and s % args.every == 0
            }
            plain = [t for s, t in zip(range(1, args.steps + 1), step_t) if s not in ckpt_steps]
            runs.append(
                {
                    "cfg": cfg,
                    "round": rnd,
                    "loop": loop,
                    "mean_step": loop / args.steps,
                    "plain_step": statistics.mean(plain),
                    "ckpt_calls": ckpt_t,
                    "final_wait": final_wait,
                }
            )
            dist.barrier()
            if rank == 0:
                for d in os.listdir(root):
                    if d.startswith(f"T-{cfg}-"):
                        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
                os.sync()
            log(
                f"round {rnd} {cfg:16s} mean step {loop / args.steps * 1e3:7.1f} ms  (steps without a save "
                f"{statistics.mean(plain) * 1e3:7.1f} ms; save calls "
                + (" ".join(f"{t:.2f}" for t in ckpt_t) or "-")
                + f" s; final wait {final_wait:.2f}s)"
            )
    shardckpt.close()
    return {"runs": runs, "n_params": n_params, "ckpt_bytes": ckpt_bytes}


def _train_windows(
    args: argparse.Namespace,
    rank: int,
    root: str,
    checkpoint: Callable[[str, Any, str], Any],
    train_step: Callable[[int], None],
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Checkpoint intervals of the configs interleaved round-robin (order rotated).

    A window is one checkpoint interval as a long run sees it: the checkpoint
    call, ``--every`` training steps (which the background write overlaps),
    then the wait for that save to finish -- exactly what the next checkpoint
    call of a continuous run would wait for (nothing, if the write fits in the
    interval). All three are timed. Interleaving whole intervals makes the
    configs see the same background load on a shared machine.
    """
    import torch.distributed as dist

    n_win = max(1, args.steps // args.every) * args.train_rounds
    wins: list[dict[str, Any]] = []
    step = 0
    for j in range(n_win):
        order = T_CONFIGS[j % len(T_CONFIGS) :] + T_CONFIGS[: j % len(T_CONFIGS)]
        for cfg in order:
            dist.barrier()
            t0 = time.perf_counter()
            pending = checkpoint(cfg, None, f"w{j}") if cfg != "none" else None
            t1 = time.perf_counter()
            for _ in range(args.every):
                step += 1
                train_step(step)
            t2 = time.perf_counter()
            if pending is not None:
                pending.result()
            t3 = time.perf_counter()
            wins.append(
                {
                    "cfg": cfg,
                    "win": j,
                    "call": t1 - t0,
                    "steps": t2 - t1,
                    "wait": t3 - t2,
                    "total": t3 - t0,
                }
            )
            dist.barrier()
            if rank == 0:
                for d in os.listdir(root):
                    if d.startswith(f"T-{cfg}-"):
                        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
                os.sync()
        if j % 3 == 2 or j == n_win - 1:
            recent = [w for w in wins if w["win"] > j - 3]
            log(
                f"windows {max(0, j - 2)}-{j}: "
                + "  ".join(
                    f"{c} {_med([w['total'] for w in recent if w['cfg'] == c]) / args.every * 1e3:.0f}"
                    for c in T_CONFIGS
                )
                + " ms/step"
            )
    return wins


def _leaves(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _leaves(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in _leaves(v)]
    return [obj]


# ---------------------------------------------------------------------------
# Worker entry
# ---------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    _quiet_warnings()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != PHASES[args.phase]:
        raise SystemExit(f"phase {args.phase} needs {PHASES[args.phase]} ranks, got {world}")
    res = {"C": phase_c, "S": phase_s, "T": phase_t}[args.phase](args)
    res["torch_threads"] = torch.get_num_threads()
    every: list[Any] = [None] * world
    dist.all_gather_object(every, res)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"phase": args.phase, "world": world, "ranks": every}, f)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def run_phase(phase: str, args: argparse.Namespace, root: str) -> dict[str, Any]:
    nproc = PHASES[phase]
    out = os.path.join(root, f"result-{phase}.json")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        os.path.abspath(__file__),
        "--phase",
        phase,
        "--gib",
        repr(args.gib),
        "--repeats",
        str(args.repeats),
        "--steps",
        str(args.steps),
        "--every",
        str(args.every),
        "--train-rounds",
        str(args.train_rounds),
        "--train-mode",
        args.train_mode,
        "--dir",
        root,
        "--out",
        out,
        "--sizes",
        ",".join(repr(g) for g in args.sizes),
        "--copy-repeats",
        str(args.copy_repeats),
    ] + (["--profile"] if args.profile else [])
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    env["PYTHONPATH"] = _REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=sys.stderr, env=env)  # stdout carries only the report
    with open(out) as f:
        res = json.load(f)
    res["wall_s"] = time.perf_counter() - t0
    return res


def _gib_list(text: str) -> list[float]:
    """``--sizes``: comma-separated positive GiB values."""
    try:
        sizes = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of GiB: {text!r}") from None
    if not sizes or any(g <= 0 for g in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive GiB values: {text!r}")
    return sizes


def _machine() -> str:
    """CPU model and count, from /proc/cpuinfo (the CPU changes between sessions)."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPU(s)"


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def _worst(per_rank: list[dict[str, Any]], field: str) -> list[float]:
    """Per round, the slowest rank's ``field`` (a collective save waits for the slowest)."""
    n = len(per_rank[0]["records"])
    return [max(pr["records"][i][field] for pr in per_rank) for i in range(n)]


def report_c(
    args: argparse.Namespace, res: dict[str, Any], targets: list[tuple[str, str, str]]
) -> list[dict[str, Any]]:
    """Print phase C's table; return its JSON rows (one per state size)."""
    ranks = res["ranks"]
    world = len(ranks)
    r0 = ranks[0]
    print(
        f"Phase C: shardckpt.async_save 2nd+ stall vs the memory-copy floor; {world} gloo ranks, "
        f"{N_TENSORS} fp32 DTensors Shard(0); {args.copy_repeats} rounds per size, save and floors "
        "interleaved (order alternating per round), both ranks copying at once"
    )
    print(
        f"  copy backend {r0['copy_impl']}, {r0['copy_threads']} copy thread(s) per rank; "
        "per save / copy the max over ranks; medians over rounds"
    )
    print(
        "  memcpy = libc memcpy of each tensor into reused, pre-faulted buffers (the floor); "
        "kernel = shardckpt's copy kernel alone; copy_ = torch.Tensor.copy_"
    )
    print(
        "  ratio = median stall / median memcpy; paired = median over rounds of stall / memcpy "
        "of the same round"
    )
    print()
    hdr = (
        f"{'GiB':>5s} {'MiB/rank':>8s} {'1st s':>6s} {'stall ms':>8s} {'memcpy ms':>9s} "
        f"{'ratio':>6s} {'paired':>6s} {'kernel ms':>9s} {'copy_ ms':>8s} {'plan ms':>7s} "
        f"{'stage ms':>8s} {'GB/s/rank':>9s}  stalls / memcpys (ms)"
    )
    print(hdr)
    print("-" * len(hdr))
    rows: list[dict[str, Any]] = []
    for k, size in enumerate(r0["sizes"]):
        per_rank = [r["sizes"][k] for r in ranks]
        stall, memcpy = _worst(per_rank, "stall"), _worst(per_rank, "memcpy")
        med = {f: _med(_worst(per_rank, f)) for f in ("stall", "memcpy", "kernel", "copy_")}
        for f in ("plan", "stage"):
            med[f] = _med(_worst(per_rank, f)) if r0["breakdown"] else float("nan")
        ratio = med["stall"] / med["memcpy"]
        paired = _med([a / b for a, b in zip(stall, memcpy)])
        rank_bytes = max(pr["my_bytes"] for pr in per_rank)
        first = max(pr["first"]["stall"] for pr in per_rank)
        print(
            f"{size['gib']:5g} {rank_bytes / MiB:8.0f} {first:6.2f} {med['stall'] * 1e3:8.1f} "
            f"{med['memcpy'] * 1e3:9.1f} {ratio:6.2f} {paired:6.2f} {med['kernel'] * 1e3:9.1f} "
            f"{med['copy_'] * 1e3:8.1f} {med['plan'] * 1e3:7.1f} {med['stage'] * 1e3:8.1f} "
            f"{rank_bytes / med['stall'] / 1e9:9.2f}  "
            + " ".join(f"{t * 1e3:.0f}" for t in stall)
            + " / "
            + " ".join(f"{t * 1e3:.0f}" for t in memcpy)
        )
        rows.append(
            {
                "size_bytes": global_bytes(size["gib"]),
                "rank_bytes": rank_bytes,
                "ranks": world,
                "stall_s": med["stall"],
                "memcpy_s": med["memcpy"],
                "ratio": ratio,
                "paired_ratio": paired,
                "first_stall_s": first,
                "kernel_s": med["kernel"],
                "torch_copy_s": med["copy_"],
                "plan_s": med["plan"],
                "stage_s": med["stage"],
                "stalls_s": stall,
                "memcpys_s": memcpy,
                "copy_impl": r0["copy_impl"],
                "copy_threads": r0["copy_threads"],
            }
        )
    print()
    for row in rows:
        targets.append(
            (
                f"2nd+ stall vs memcpy floor, {row['rank_bytes'] / MiB:.0f} MiB/rank",
                f"{row['stall_s'] * 1e3:.1f} / {row['memcpy_s'] * 1e3:.1f} ms = "
                f"{row['ratio']:.2f}x (paired {row['paired_ratio']:.2f}x)",
                f"<= {FLOOR_RATIO_TARGET}x  {_verdict(row['ratio'] <= FLOOR_RATIO_TARGET)}",
            )
        )
    return rows


def report_s(
    args: argparse.Namespace, res: dict[str, Any], targets: list[tuple[str, str, str]]
) -> dict[str, float]:
    ranks = res["ranks"]
    world = len(ranks)
    gb = global_bytes(args.gib)
    budget = max(r["budget"] for r in ranks)
    print(
        f"Phase S: {gb / (1 << 30):.2f} GiB fp32 in 16 DTensors Shard(0), {world} gloo ranks "
        f"({ranks[0]['my_bytes'] / MiB:.0f} MiB per rank); {args.repeats} saves per variant, "
        "interleaved (order rotated per round), each to a fresh dir, committed before the next"
    )
    print(
        "  stall = call -> return (dcp-bgstage: -> staging done), per save the max over ranks; "
        "commit = call -> durable commit on all ranks"
    )
    mem = "VmHWM reset per save" if all(r["hwm_reset"] for r in ranks) else "RSS sampled / 2 ms"
    print(
        f"  peak +MiB = most RSS the variant held above a process that never saved with it ({mem}); "
        "held = kept between saves; max over ranks"
    )
    ref = ", ".join(
        f"r{i} {r['my_bytes'] / r['ref_copy_s'] / 1e9:.2f}" for i, r in enumerate(ranks)
    )
    print(
        f"  reference: plain copy_ of a rank's shard into reused buffers, ranks at once: {ref} GB/s"
    )
    print()
    hdr = (
        f"{'variant':17s} {'1st stall':>9s} {'2nd+ stall':>10s} {'2nd+ per rank':>14s} "
        f"{'GB/s/rank':>9s} {'commit s':>8s} {'peak +MiB':>9s} {'held MiB':>8s}  2nd+ stalls (s)"
    )
    print(hdr)
    print("-" * len(hdr))
    med2: dict[str, float] = {}
    peak_extra: dict[str, float] = {}
    gbps_min: dict[str, float] = {}
    for v in S_VARIANTS:
        per_rank = [[x for x in r["records"] if x["variant"] == v] for r in ranks]
        n = len(per_rank[0])
        stall = [max(pr[i]["stall"] for pr in per_rank) for i in range(n)]
        commit = [max(pr[i]["commit"] for pr in per_rank) for i in range(n)]
        med2[v] = _med(stall[1:])
        rank_med = [_med([x["stall"] for x in pr[1:]]) for pr in per_rank]
        gbps_min[v] = min(r["my_bytes"] / m / 1e9 for r, m in zip(ranks, rank_med))
        peaks, helds = [], []
        for pr in per_rank:
            held = 0  # memory this variant kept between its saves (pool / cache)
            peak = 0
            for x in pr:
                peak = max(peak, held + x["peak"] - x["rss_before"])
                held += x["rss_after"] - x["rss_before"]
            peaks.append(peak)
            helds.append(held)
        peak_extra[v] = max(peaks) / MiB
        print(
            f"{v:17s} {stall[0]:9.3f} {med2[v]:10.3f} {'/'.join(f'{m:.3f}' for m in rank_med):>14s} "
            f"{gbps_min[v]:9.2f} {_med(commit):8.2f} {peak_extra[v]:9.0f} {max(helds) / MiB:8.0f}  "
            + " ".join(f"{t:.3f}" for t in stall[1:])
        )
    bg = [max(x["returned"] for x in r["records"] if x["variant"] == "dcp-bgstage") for r in ranks]
    print(
        f"  dcp-bgstage: async_save itself returned after <= {max(bg):.3f}s; "
        "its stall above waits for staging"
    )
    rtypes = sorted({f"{x['variant']}: {x['return_type']}" for r in ranks for x in r["records"]})
    print("  return types: " + "; ".join(rtypes))
    if all(r.get("breakdown") for r in ranks):
        print(
            "  shardckpt stall split (median ms; 'other' = the rest, e.g. process-group creation):"
        )
        for v in ("shardckpt", "shardckpt-budget"):
            for which, sl in (("1st", slice(0, 1)), ("2nd+", slice(1, None))):
                parts = []
                for i, r in enumerate(ranks):
                    recs = [x for x in r["records"] if x["variant"] == v][sl]
                    pl = _med([x["plan"] for x in recs])
                    stg = _med([x["stage"] for x in recs])
                    tot = _med([x["stall"] for x in recs])
                    parts.append(
                        f"r{i} plan {pl * 1e3:4.0f} + stage {stg * 1e3:4.0f} + other "
                        f"{(tot - pl - stg) * 1e3:4.0f} = {tot * 1e3:5.0f}"
                    )
                print(f"    {v:16s} {which:4s}  " + "  |  ".join(parts))
        cp = min(
            r["my_bytes"]
            / _med([x["stage"] for x in r["records"] if x["variant"] == "shardckpt"][1:])
            for r in ranks
        )
        print(
            f"    shardckpt 2nd+ staging copy alone (without planning): {cp / 1e9:.2f} GB/s (slowest rank)"
        )
    print(f"  shardckpt-budget: {budget / MiB:.0f} MiB per rank ({BUDGET_FRACTION} x shard)")
    print("  DCP staging options that need CUDA, tried on a tiny state:")
    for k, v in ranks[0]["probes"].items():
        print(f"    {k}: {v}")
    if ranks[0].get("profile"):
        print()
        print(ranks[0]["profile"].rstrip())
    print()
    ratio = med2["shardckpt"] / med2["dcp"]
    targets.append(
        (
            "2nd+ stall vs DCP async_save (default stager)",
            f"{med2['shardckpt']:.3f}s / {med2['dcp']:.3f}s = {ratio:.3f}x "
            f"(vs dcp-cached {med2['shardckpt'] / med2['dcp-cached']:.2f}x)",
            f"<= 0.2x  {_verdict(ratio <= 0.2)}",
        )
    )
    targets.append(
        (
            "staging GB/s per rank (2nd+ stall)",
            f"{gbps_min['shardckpt']:.2f} GB/s (slowest rank)",
            f">= 8  {_verdict(gbps_min['shardckpt'] >= 8)}",
        )
    )
    lim = budget / MiB + RSS_SLACK_MIB
    targets.append(
        (
            "budgeted peak extra RSS",
            f"{peak_extra['shardckpt-budget']:.0f} MiB (budget {budget / MiB:.0f}), "
            f"2nd+ stall {med2['shardckpt-budget']:.3f}s",
            f"<= {lim:.0f} MiB  {_verdict(peak_extra['shardckpt-budget'] <= lim)}",
        )
    )
    return med2


def report_t(
    args: argparse.Namespace, res: dict[str, Any], targets: list[tuple[str, str, str]]
) -> dict[str, Any]:
    if "windows" in res["ranks"][0]:
        return report_t_windows(args, res, targets)
    ranks = res["ranks"]
    r0 = ranks[0]
    print(
        f"Phase T: MLP {r0['n_params'] / 1e6:.1f}M params + Adam ({r0['ckpt_bytes'] / MiB:.0f} MiB checkpoint, "
        f"replicated: each rank writes ~half), DDP on 2 gloo ranks, {r0['torch_threads']} torch thread(s)/rank; "
        f"{args.steps} steps, checkpoint every {args.every}; {args.train_rounds} round(s), order rotated; medians over rounds"
    )
    print(
        "  mean step = timed loop / steps, max over ranks (includes save calls and waits for the previous save); "
        "'plain step' = steps without a save call"
    )
    print()
    hdr = (
        f"{'config':16s} {'mean step ms':>12s} {'slowdown':>9s} {'plain step ms':>13s} {'save call s':>11s} "
        f"{'final wait s':>12s}  per round ms (slowdown vs that round's none)"
    )
    print(hdr)
    print("-" * len(hdr))
    mean: dict[str, float] = {}
    slow: dict[str, float] = {}
    for cfg in T_CONFIGS:
        rr_all = [
            [next(x for x in r["runs"] if x["cfg"] == cfg and x["round"] == rnd) for r in ranks]
            for rnd in range(args.train_rounds)
        ]
        per_round = [max(x["mean_step"] for x in rr) for rr in rr_all]
        mean[cfg] = _med(per_round)
        plain = _med([max(x["plain_step"] for x in rr) for rr in rr_all])
        calls = [
            max(x["ckpt_calls"][i] for x in rr)
            for rr in rr_all
            for i in range(len(rr[0]["ckpt_calls"]))
        ]
        waits = _med([max(x["final_wait"] for x in rr) for rr in rr_all])
        slow[cfg] = (mean[cfg] - mean["none"]) / mean["none"]
        none_rounds = [
            max(
                x["mean_step"]
                for r in ranks
                for x in r["runs"]
                if x["cfg"] == "none" and x["round"] == k
            )
            for k in range(args.train_rounds)
        ]
        round_slow = [(t - b) / b * 100 for t, b in zip(per_round, none_rounds)]
        print(
            f"{cfg:16s} {mean[cfg] * 1e3:12.1f} {slow[cfg] * 100:8.1f}% {plain * 1e3:13.1f} "
            f"{(_med(calls) if calls else 0):11.3f} {waits:12.2f}  "
            + " ".join(f"{t * 1e3:.0f}" for t in per_round)
            + ("" if cfg == "none" else " (" + " ".join(f"{x:+.0f}%" for x in round_slow) + ")")
        )
    print(
        "  save call s = median time of a checkpoint call in the loop (state_dict + stall + wait for the previous save)"
    )
    print()
    sa, da = slow["shardckpt-async"], slow["dcp-async"]
    if da > 0:
        ratio = sa / da
        val = f"{sa * 100:.1f}% / {da * 100:.1f}% = {ratio:.2f}x (sync: {slow['shardckpt-sync'] * 100:.1f}%)"
        ok = ratio <= 1 / 3
    else:
        val = f"{sa * 100:.1f}% vs DCP {da * 100:.1f}% (DCP slowdown not positive: ratio undefined)"
        ok = sa <= 0
    targets.append(
        (
            f"training slowdown, async every {args.every} steps",
            val,
            f"<= 1/3 of DCP's  {_verdict(ok)}",
        )
    )
    return {"mode": "runs", "mean_step_s": mean, "slowdown": slow}


def report_t_windows(
    args: argparse.Namespace, res: dict[str, Any], targets: list[tuple[str, str, str]]
) -> dict[str, Any]:
    ranks = res["ranks"]
    r0 = ranks[0]
    k = args.every
    n_win = max(1, args.steps // k) * args.train_rounds
    print(
        f"Phase T: MLP {r0['n_params'] / 1e6:.1f}M params + fused Adam ({r0['ckpt_bytes'] / MiB:.0f} MiB "
        f"checkpoint, replicated: each rank writes ~half), DDP on 2 gloo ranks, {r0['torch_threads']} "
        f"torch thread(s)/rank, batch {BATCH}; checkpoint every {k} steps"
    )
    print(
        f"  {n_win} checkpoint intervals per config ({n_win * k} steps), interleaved round-robin with the "
        "configs (order rotated); interval = save call + "
        f"{k} steps + wait for that save (what the next call would wait for); max over ranks"
    )
    print(
        "  step ms = median interval / steps; slowdown = (step - step_none) / step_none; "
        "also: steps alone (contention from the background write), save call and end wait"
    )
    print()
    hdr = (
        f"{'config':16s} {'step ms':>8s} {'mean ms':>8s} {'slowdown':>9s} {'steps-only ms':>13s} "
        f"{'save call s':>11s} {'end wait s':>10s}  {'slowdown by third of the run':s}"
    )
    print(hdr)
    print("-" * len(hdr))

    def per_win(cfg: str, field: str) -> list[float]:
        return [
            max(
                next(w[field] for w in r["windows"] if w["cfg"] == cfg and w["win"] == j)
                for r in ranks
            )
            for j in range(n_win)
        ]

    step: dict[str, float] = {}
    slow: dict[str, float] = {}
    base = per_win("none", "total")
    for cfg in T_CONFIGS:
        tot = per_win(cfg, "total")
        step[cfg] = _med(tot) / k
        slow[cfg] = (step[cfg] - step["none"]) / step["none"]
        thirds = []
        for part in range(3):
            sl = slice(part * n_win // 3, (part + 1) * n_win // 3)
            if tot[sl]:
                thirds.append((_med(tot[sl]) - _med(base[sl])) / _med(base[sl]) * 100)
        print(
            f"{cfg:16s} {step[cfg] * 1e3:8.1f} {statistics.mean(tot) / k * 1e3:8.1f} "
            f"{slow[cfg] * 100:8.1f}% {_med(per_win(cfg, 'steps')) / k * 1e3:13.1f} "
            f"{_med(per_win(cfg, 'call')):11.3f} {_med(per_win(cfg, 'wait')):10.3f}  "
            + ("" if cfg == "none" else " ".join(f"{x:+.0f}%" for x in thirds))
        )
    print(
        "  save call s = state_dict + stall (sync: the whole save); end wait s = the save still running "
        f"after {k} steps"
    )
    print()
    sa, da = slow["shardckpt-async"], slow["dcp-async"]
    if da > 0:
        ratio = sa / da
        val = (
            f"{sa * 100:.1f}% / {da * 100:.1f}% = {ratio:.2f}x "
            f"(sync: {slow['shardckpt-sync'] * 100:.1f}%)"
        )
        ok = ratio <= 1 / 3
    else:
        val = f"{sa * 100:.1f}% vs DCP {da * 100:.1f}% (DCP slowdown not positive: ratio undefined)"
        ok = sa <= 0
    targets.append(
        (f"training slowdown, async every {k} steps", val, f"<= 1/3 of DCP's  {_verdict(ok)}")
    )
    return {"mode": "windows", "step_s": step, "slowdown": slow}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--gib", type=float, default=2.0, help="phase S: total fp32 state in GiB (default 2)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="phase S: saves per variant (>= 3)")
    ap.add_argument("--steps", type=int, default=60, help="phase T: timed training steps per run")
    ap.add_argument("--every", type=int, default=10, help="phase T: checkpoint every N steps")
    ap.add_argument(
        "--train-rounds",
        type=int,
        default=2,
        help="phase T: rounds of --steps steps per config (interleaved)",
    )
    ap.add_argument(
        "--train-mode",
        choices=("windows", "runs"),
        default="windows",
        help="phase T: interleave checkpoint intervals of the configs (default), or whole runs",
    )
    ap.add_argument(
        "--dir", default=None, help="parent directory for the benchmark's scratch directory"
    )
    ap.add_argument(
        "--profile", action="store_true", help="cProfile one shardckpt.async_save on rank 0"
    )
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (JSON)")
    ap.add_argument(
        "--phases",
        default="CST",
        help="phases to run, letters from CST (default CST; the copy-floor table alone: C)",
    )
    ap.add_argument(
        "--sizes",
        type=_gib_list,
        default=[0.25, 0.5, 1.0],
        help="phase C: total state sizes in GiB, comma-separated (default 0.25,0.5,1)",
    )
    ap.add_argument(
        "--copy-repeats",
        type=int,
        default=7,
        help="phase C: rounds (save + floors) per size after the first save (default 7)",
    )
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeats < 3:
        ap.error("--repeats must be >= 3")
    if args.gib <= 0 or args.steps < 1 or args.every < 1 or args.train_rounds < 1:
        ap.error("--gib, --steps, --every and --train-rounds must be positive")
    if args.copy_repeats < 1:
        ap.error("--copy-repeats must be positive")

    if args.phase is not None:
        worker(args)
        return
    if not args.phases or set(args.phases) - set(PHASES):
        ap.error("--phases: letters from CST")

    t0 = time.perf_counter()
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    root = tempfile.mkdtemp(prefix="shardckpt-bench-async-", dir=args.dir)
    print(f"benchmark directory: {root}", file=sys.stderr, flush=True)
    results: dict[str, dict[str, Any]] = {}
    try:
        for phase in args.phases:
            try:
                results[phase] = run_phase(phase, args, root)
            except subprocess.CalledProcessError as e:
                print(
                    f"phase {phase} failed (torchrun exit status {e.returncode}); see its output above",
                    file=sys.stderr,
                )
                sys.exit(2)
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

    import torch

    print()
    print(
        f"shardckpt.async_save vs torch.distributed.checkpoint.async_save -- torch {torch.__version__}, "
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPU(s)"
    )
    print()
    targets: list[tuple[str, str, str]] = []
    summary: dict[str, Any] = {
        "benchmark": "bench_async",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": _machine(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "rows": [],
    }
    if "C" in results:
        summary["rows"] = report_c(args, results["C"], targets)
    if "S" in results:
        summary["stall_2nd_s"] = report_s(args, results["S"], targets)
    if "T" in results:
        summary["training"] = report_t(args, results["T"], targets)
    print("targets (issue 3; copy floor: issue 12 section 3):")
    for name, val, verdict in targets:
        print(f"  {name:42s} {val:58s} {verdict}")
    print()
    walls = ", ".join(f"{p}: {r['wall_s']:.0f}s" for p, r in results.items())
    print(f"total wall time {time.perf_counter() - t0:.0f}s (phases incl. launch: {walls})")
    if args.json:
        summary["targets"] = [{"name": n, "value": v, "verdict": x} for n, v, x in targets]
        summary["wall_s"] = {p: r["wall_s"] for p, r in results.items()}
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
        print(f"results written to {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
