#!/usr/bin/env python
"""Core benchmark: shardckpt vs torch.distributed.checkpoint (DCP), same run.

    python benchmarks/bench_core.py [--gib 2] [--repeats 3] [--warmup 1] [--dir /tmp/x] [--drop-caches] [--keep]
                                    [--libs shardckpt,dcp,torch-save,torch-ckpt] [--json out.json]

State: ``--gib`` GiB of fp32 in 16 DTensors, ``Shard(0)`` on a 1-D CPU mesh of 2
gloo ranks; each rank builds only its own local shard (seeded ``randn`` per
(tensor, rank), then ``DTensor.from_local``), so no rank ever materializes the
whole state.

Phases, each a separate ``python -m torch.distributed.run --standalone`` (torchrun)
launch of this same file with ``--phase``; rank 0 writes its results as JSON that
this driver reads:

  A (2 ranks)  save: shardckpt.save vs dcp.save(FileSystemWriter(sync_files=True)),
               interleaved A B A B ..., a fresh directory per run (the previous
               run's directory is deleted outside the timed region; the last one
               of each library is kept for the loads).
               load: same world size, interleaved, into preallocated DTensors.
  B (3 ranks)  resharded load 2 -> 3 ranks (uneven Shard(0) splits), interleaved.
  C (1 rank)   resharded load 2 -> 1 rank, interleaved.

Warm-up: before the timed runs of each operation, each library does ``--warmup``
(default 1) untimed runs, interleaved the same way; their times are printed
separately. They absorb first-call costs that a long-running trainer pays once
(on a VM, notably the first touch of fresh guest memory by the page cache or by
freshly allocated buffers, which made the very first save of either library
2-4x slower than the rest here). ``--warmup 0`` measures cold first calls.

Timing (rank 0): barrier, start clock, call, barrier, stop clock. Both libraries'
``save`` return only after the checkpoint is committed on all ranks, and both
fsync their data (shardckpt always does; DCP because ``sync_files=True``).
Correctness: before every timed load the first and last tensors' local shards are
poisoned with NaN; after the call (outside the timed region) they are compared
with regenerated expected values on every rank.

Reported per operation: median seconds, GB/s (global tensor bytes / median,
1 GB = 1e9 B), and the ratio shardckpt throughput / DCP throughput against the
targets (save >= 1.5x, same-world load >= 1.2x, reshard 2->3 >= 1.5x; 2->1 is
reported only).

Other peers (``--libs``; off by default, used by ``python -m benchmarks``):

  torch-save   what a job without a checkpoint library does: every rank
               ``torch.save``s a dict of its local shards to its own file and
               fsyncs it; loads ``torch.load(mmap=True, weights_only=True)`` the
               files that hold the rows this rank needs and ``copy_`` the slices
               (so a resharded load reads only the bytes it needs, as ours does).
  torch-ckpt   Meta's ``torch_checkpointing`` (PyPI ``torch_checkpointing``):
               ``CheckpointManager`` with a synchronous saver, ``DefaultResharder``
               and ``LocalFileSystemStorageConfig(use_direct_io=False)`` (its
               O_DIRECT write path fails on some filesystems; its resharding reader
               still tries O_DIRECT and falls back to buffered reads where the
               filesystem refuses). It never fsyncs, so each rank fsyncs the files it
               wrote inside the timed region, as the other contenders do. Two
               work-arounds for 0.1.1, nothing else of it is changed: its metadata
               all-gather hard-codes ``device="cuda"`` (replaced by the same gather
               through ``all_gather_object``), and its synchronous saver writes the
               resharding metadata only on a manager's first save (its metadata
               cache is turned off, so every save writes it).

``--json PATH`` also writes the medians, GB/s, ratios and sizes as JSON.

Page cache: without ``--drop-caches`` loads right after saves are served from the
page cache for both libraries. With ``--drop-caches`` rank 0 runs ``sync`` and
writes 3 to /proc/sys/vm/drop_caches before every timed load (outside the timed
region); whether that worked (and how much "Cached" memory it freed) is reported.
Note that on a VM the host may still cache the virtual disk.
"""


from __future__ import annotations

import argparse
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # benchmark the checkout this file lives in
    sys.path.insert(0, _REPO)

from benchmarks._common import run_phases, write_json  # noqa: E402
from benchmarks._core import ALL_LIBS, LIBS, PHASES  # noqa: E402
from benchmarks._core.report import report, summary  # noqa: E402
from benchmarks._core.worker import worker  # noqa: E402


def _phase_args(args: argparse.Namespace) -> list[str]:
    """What every phase's ranks are told (``--phase``, ``--dir`` and ``--out`` aside)."""
    return ["--gib", repr(args.gib), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
            "--libs", ",".join(args.libs)] + (["--drop-caches"] if args.drop_caches else [])  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=2.0, help="total fp32 state in GiB (default 2)")
    ap.add_argument(
        "--libs",
        type=lambda v: [x for x in v.split(",") if x],
        default=list(LIBS),
        help=f"comma-separated, interleaved in this order; from {','.join(ALL_LIBS)} (default shardckpt,dcp)",
    )
    ap.add_argument(
        "--repeats", type=int, default=3, help="timed runs per library and operation (>= 3)"
    )
    ap.add_argument(
        "--warmup", type=int, default=1, help="untimed warm-up runs per library and operation"
    )
    ap.add_argument(
        "--dir", default=None, help="parent directory for the benchmark's scratch directory"
    )
    ap.add_argument(
        "--drop-caches", action="store_true", help="drop the page cache before every timed load"
    )
    ap.add_argument(
        "--keep", action="store_true", help="keep the scratch directory (checkpoints, JSON)"
    )
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--phases", default="ABC", help=argparse.SUPPRESS)  # dev: e.g. "A" or "AC"
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap


def main() -> None:
    ap = _parser()
    args = ap.parse_args()
    unknown = [lib for lib in args.libs if lib not in ALL_LIBS]
    if unknown or not args.libs:
        ap.error(f"--libs: unknown {unknown}; choose from {','.join(ALL_LIBS)}")
    if args.repeats < 3:
        ap.error("--repeats must be >= 3")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    if args.gib <= 0:
        ap.error("--gib must be positive")

    if args.phase is not None:
        worker(args)
        return
    if set(args.phases) - set(PHASES) or (set(args.phases) - {"A"} and "A" not in args.phases):
        ap.error("--phases: letters from ABC, and B/C load what A saved, so A must be included")

    t0 = time.perf_counter()
    results = run_phases(
        __file__, args.phases, lambda p: PHASES[p][0],
        lambda p, root, out: [*_phase_args(args), "--dir", root, "--out", out],
        parent=args.dir, keep=args.keep, prefix="shardckpt-bench-",
    )  # fmt: skip
    ok = report(args, results, time.perf_counter() - t0)
    if args.json:
        write_json(summary(args, results), args.json)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
