"""Phase S of ``bench_async.py`` (rank side): stall, commit time and memory per variant.

The state of ``bench_core.py`` (``--gib`` GiB, 16 DTensors ``Shard(0)``, 2 gloo
ranks). ``--repeats`` rounds; in each, every variant of ``S_VARIANTS`` saves once
to a fresh directory and waits for its durable commit, the variants' order
rotated per round. Per save and rank: the stall, the commit time and the memory
above the RSS before the call (see ``bench_async.py``'s docstring).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

from benchmarks._async import BUDGET_FRACTION, S_VARIANTS, MiB
from benchmarks._async.measure import (
    RssSampler,
    hwm_bytes,
    instrument_shardckpt,
    malloc_trim,
    probe_cpu_options,
    reset_hwm,
    rss_bytes,
    settle_dcp_threads,
)
from benchmarks._common import rank0_clear, rank0_logger, rotated
from benchmarks._state import make_state, rows_for, source_shard

__all__ = ["phase_s"]

# what starting a save returns: (staging waiter or None, commit waiter, reported stall or None, return type)
Started = tuple[Callable[[], Any] | None, Callable[[], Any], float | None, str]


class _Variants:
    """The five ways of saving, each with what it keeps across saves."""

    def __init__(self, dcp_pg: Any, budget: int) -> None:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        import shardckpt

        self.dcp_pg, self.budget = dcp_pg, budget
        self.budget_ckpt = shardckpt.AsyncCheckpointer()
        self.stagers = {
            "dcp": None,
            "dcp-cached": DefaultStager(StagingOptions(False, False, False, False)),
            "dcp-bgstage": DefaultStager(StagingOptions(False, False, True, False)),
        }

    def start(self, variant: str, sd: dict[str, Any], path: str) -> Started:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        import shardckpt

        if variant == "shardckpt":
            h = shardckpt.async_save(sd, path)
            return None, h.result, h.stall_seconds, type(h).__name__
        if variant == "shardckpt-budget":
            h = self.budget_ckpt.async_save(sd, path, staging_budget_bytes=self.budget)
            return None, h.result, h.stall_seconds, type(h).__name__
        stager = self.stagers[variant]
        kw = {} if stager is None else {"async_stager": stager}
        r = dcp.async_save(
            sd, storage_writer=FileSystemWriter(path, sync_files=True), process_group=self.dcp_pg, **kw
        )
        staging = getattr(r, "staging_completion", None)
        upload = getattr(r, "upload_completion", r)
        return (staging.result if staging is not None else None), upload.result, None, type(r).__name__

    def close(self) -> None:
        import shardckpt

        shardckpt.close()
        self.budget_ckpt.close()
        for stager in self.stagers.values():
            if stager is not None:
                stager.close()


def _reference_copy(src: dict[str, Any]) -> list[float]:
    """Copy this rank's shard into a reused, pre-faulted buffer, both ranks at once, 3 times."""
    import torch
    import torch.distributed as dist

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
    return ref_times


def _one_save(variants: _Variants, variant: str, rnd: int, src: dict[str, Any], root: str,
              breakdown: dict[str, float] | None, hwm_ok: bool) -> dict[str, Any]:  # fmt: skip
    """One save of ``variant``, both ranks starting together: its times and memory record."""
    import torch.distributed as dist

    rank = dist.get_rank()
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
    wait_staged, wait_commit, reported, rtype = variants.start(variant, src, path)
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
    rec = {"variant": variant, "round": rnd, "returned": t_ret, "stall": t_staged,
           "commit": t_commit, "reported_stall": reported, "return_type": rtype,
           "rss_before": rss0, "peak": peak, "rss_after": rss_bytes()}  # fmt: skip
    if breakdown is not None and variant.startswith("shardckpt"):
        rec["plan"], rec["stage"] = breakdown["plan"], breakdown["stage"]
    rank0_clear(path)  # the next save starts with no dirty pages of this one
    return rec


def _profile(src: dict[str, Any], root: str) -> str | None:
    """One more shardckpt.async_save, under cProfile on rank 0: where its stall went (rank 0)."""
    import cProfile
    import io
    import pstats

    import torch.distributed as dist

    import shardckpt

    rank = dist.get_rank()
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
    if rank != 0:
        return None
    shutil.rmtree(path, ignore_errors=True)
    s = io.StringIO()
    s.write(f"one steady-state shardckpt.async_save on rank 0: stall {stall:.3f}s (under cProfile)\n")
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(22)
    return s.getvalue()


def phase_s(args: argparse.Namespace) -> dict[str, Any]:
    """Every variant ``--repeats`` times, interleaved; this rank's records and setup."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    rows = rows_for(args.gib)
    root = args.dir
    dcp_pg = dist.new_group(backend="gloo")
    log = rank0_logger(f"phase S | {world} ranks")

    probes = probe_cpu_options(dcp_pg, root, dist.get_rank())
    for k, v in probes.items():
        log(f"probe {k}: {v}")
    t_build = time.perf_counter()
    src = make_state(mesh, rows, lambda i, size, r: source_shard(i, rows, r))
    my_bytes = sum(t.to_local().numel() * t.to_local().element_size() for t in src.values())
    log(f"built source state ({time.perf_counter() - t_build:.1f}s); {my_bytes / MiB:.0f} MiB per rank")
    ref_times = _reference_copy(src)
    log(f"reference copy into reused buffers: {my_bytes / statistics.median(ref_times) / 1e9:.2f} GB/s")

    breakdown = instrument_shardckpt()
    variants = _Variants(dcp_pg, int(BUDGET_FRACTION * my_bytes))
    hwm_ok = reset_hwm()
    records: list[dict[str, Any]] = []
    for rnd in range(args.repeats):
        for variant in rotated(S_VARIANTS, rnd):
            rec = _one_save(variants, variant, rnd, src, root, breakdown, hwm_ok)
            records.append(rec)
            log(
                f"round {rnd} {variant:16s} stall {rec['stall']:6.3f}s (returned {rec['returned']:6.3f}s)  "
                f"commit {rec['commit']:6.3f}s  peak +{(rec['peak'] - rec['rss_before']) / MiB:6.0f} MiB, "
                f"held +{(rec['rss_after'] - rec['rss_before']) / MiB:6.0f} MiB"
            )
    profile_text = _profile(src, root) if args.profile else None
    variants.close()
    return {
        "records": records,
        "my_bytes": my_bytes,
        "budget": variants.budget,
        "ref_copy_s": statistics.median(ref_times),
        "probes": probes,
        "hwm_reset": hwm_ok,
        "breakdown": breakdown is not None,
        "profile": profile_text,
    }
