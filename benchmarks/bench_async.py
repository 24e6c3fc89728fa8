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
import os
import sys
import time
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # benchmark the checkout this file lives in
    sys.path.insert(0, _REPO)

from benchmarks._async import PHASES  # noqa: E402
from benchmarks._async.phase_c import phase_c  # noqa: E402
from benchmarks._async.phase_s import phase_s  # noqa: E402
from benchmarks._async.phase_t import phase_t  # noqa: E402
from benchmarks._async.report import Targets, report_c, report_s  # noqa: E402
from benchmarks._async.report_t import report_t  # noqa: E402
from benchmarks._common import (  # noqa: E402
    cpu_model,
    finish_ranks,
    quiet_warnings,
    run_phases,
    write_json,
)


def worker(args: argparse.Namespace) -> None:
    """One phase on this rank (under torchrun); rank 0 writes every rank's results to ``--out``."""
    import torch
    import torch.distributed as dist

    quiet_warnings(pinned_memory=True)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    if world != PHASES[args.phase]:
        raise SystemExit(f"phase {args.phase} needs {PHASES[args.phase]} ranks, got {world}")
    res = {"C": phase_c, "S": phase_s, "T": phase_t}[args.phase](args)
    res["torch_threads"] = torch.get_num_threads()
    every: list[Any] = [None] * world
    dist.all_gather_object(every, res)
    finish_ranks({"phase": args.phase, "world": world, "ranks": every}, args.out)


def _phase_args(args: argparse.Namespace) -> list[str]:
    """What every phase's ranks are told (``--phase``, ``--dir`` and ``--out`` aside)."""
    return ["--gib", repr(args.gib), "--repeats", str(args.repeats), "--steps", str(args.steps),
            "--every", str(args.every), "--train-rounds", str(args.train_rounds),
            "--train-mode", args.train_mode, "--sizes", ",".join(repr(g) for g in args.sizes),
            "--copy-repeats", str(args.copy_repeats)] + (["--profile"] if args.profile else [])  # fmt: skip


def _gib_list(text: str) -> list[float]:
    """``--sizes``: comma-separated positive GiB values."""
    try:
        sizes = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of GiB: {text!r}") from None
    if not sizes or any(g <= 0 for g in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive GiB values: {text!r}")
    return sizes


def _parser() -> argparse.ArgumentParser:
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
    return ap


def _parse() -> argparse.Namespace:
    ap = _parser()
    args = ap.parse_args()
    if args.repeats < 3:
        ap.error("--repeats must be >= 3")
    if args.gib <= 0 or args.steps < 1 or args.every < 1 or args.train_rounds < 1:
        ap.error("--gib, --steps, --every and --train-rounds must be positive")
    if args.copy_repeats < 1:
        ap.error("--copy-repeats must be positive")
    if args.phase is None and (not args.phases or set(args.phases) - set(PHASES)):
        ap.error("--phases: letters from CST")
    return args


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]], total_s: float) -> None:
    """Print every phase's table and the targets; write the ``--json`` summary."""
    import torch

    print()
    print(
        f"shardckpt.async_save vs torch.distributed.checkpoint.async_save -- torch {torch.__version__}, "
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPU(s)"
    )
    print()
    targets: Targets = []
    summary: dict[str, Any] = {
        "benchmark": "bench_async",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{cpu_model('unknown CPU')}, {os.cpu_count()} CPU(s)",
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
    print(f"total wall time {total_s:.0f}s (phases incl. launch: {walls})")
    if args.json:
        summary["targets"] = [{"name": n, "value": v, "verdict": x} for n, v, x in targets]
        summary["wall_s"] = {p: r["wall_s"] for p, r in results.items()}
        write_json(summary, args.json, announce=sys.stderr)


def main() -> None:
    args = _parse()
    if args.phase is not None:
        worker(args)
        return
    t0 = time.perf_counter()
    results = run_phases(
        __file__, args.phases, PHASES.__getitem__,
        lambda p, root, out: [*_phase_args(args), "--dir", root, "--out", out],
        parent=args.dir, keep=args.keep, prefix="shardckpt-bench-async-",
    )  # fmt: skip
    report(args, results, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
