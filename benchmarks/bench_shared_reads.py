#!/usr/bin/env python
"""Shared reads: a replicated (DDP-style) state loaded by every rank, with each
replicated piece read once and broadcast (``knobs.shared_reads="on"``) vs every
rank reading all of it (``"off"``), from S3 (moto) and from a local filesystem.

    python benchmarks/bench_shared_reads.py [--gib 1] [--reps 3] [--ranks 2] [--json out.json]

State: ``--gib`` GiB of fp32 in 16 plain tensors, the same on every rank (DDP
replicas: every rank loads every tensor whole), seeded ``randn * 0.02``. It is
saved once per backend (``compression=None``: the comparison is about moving
bytes; a save writes each replica once), then loaded into a zeroed state,
interleaved on, off, on, off, ... over ``--reps`` rounds per backend after
``--warmup`` untimed rounds; every load is checked tensor by tensor outside the
timed region.

The S3 endpoint is moto's ThreadedMotoServer (tests/s3util.py) started in this
driver process, which does nothing else while the ranks run (as in
bench_s3.py). The local checkpoint lies in a temporary directory (``--local-dir``
to choose one); it was just written, so its reads come from the page cache.

Timing (rank 0): barrier, t0, ``shardckpt.load``, barrier, t1. Medians; GB/s is
the state's bytes (each rank loads all of them) / seconds, 1 GB = 1e9 B.
Target (issue 12, section 4): on S3, shared reads ≥ 1.6x faster than off.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # benchmark the checkout this file lives in
    sys.path.insert(0, _REPO)

from benchmarks._common import all_ranks, finish_ranks, machine, rank0_logger, write_json  # noqa: E402
from benchmarks._s3_launch import add_worker_flags, run_ranks_on_s3  # noqa: E402
from benchmarks._state import COLS, N_TENSORS, rows_for  # noqa: E402

SEED = 20241201
MODES = ("on", "off")
BACKENDS = ("s3", "local")
TARGET_S3 = 1.6


def _state(rows: int, zero: bool) -> dict[str, Any]:
    """The replicated state (the same seed on every rank), or zeros of its shape."""
    import torch

    sd = {}
    for i in range(N_TENSORS):
        if zero:
            sd[f"layers.{i:02d}.weight"] = torch.zeros(rows, COLS)
        else:  # the same seed on every rank: replicas
            g = torch.Generator().manual_seed(SEED + i)
            sd[f"layers.{i:02d}.weight"] = torch.randn(rows, COLS, generator=g).mul_(0.02)
    return sd


def _all_equal(dest: dict[str, Any], src: dict[str, Any]) -> bool:
    import torch

    return all_ranks(all(torch.equal(dest[k], src[k]) for k in src))


def _timed_load(dest: dict[str, Any], url: str, so: Any, mode: str) -> float:
    import torch.distributed as dist

    import shardckpt
    from shardckpt import knobs

    for t in dest.values():
        t.zero_()
    dist.barrier()
    t0 = time.perf_counter()
    with knobs.override(shared_reads=mode):
        shardckpt.load(dest, url, storage_options=so)
    dist.barrier()
    return time.perf_counter() - t0


def _warm_up(urls: dict[str, tuple[str, Any]]) -> None:
    """Untimed, on a tiny state: connections, imports, first calls of both modes."""
    import shardckpt

    tiny, tiny_dest = _state(4, False), _state(4, True)
    for b in BACKENDS:
        url, so = urls[b]
        shardckpt.save(tiny, url + "-tiny", storage_options=so, compression=None)
        for mode in MODES:
            _timed_load(tiny_dest, url + "-tiny", so, mode)
            if not _all_equal(tiny_dest, tiny):
                raise SystemExit(f"warm-up: {b} shared_reads={mode} loaded wrong data")


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import shardckpt
    from shardckpt import knobs
    from tests.s3util import storage_options_for

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    log = rank0_logger("bench_shared_reads")
    urls = {"s3": (f"s3://{args.bucket}/replicated", storage_options_for(args.endpoint)),
            "local": (os.path.join(args.local_dir, "replicated"), None)}  # fmt: skip
    _warm_up(urls)
    rows = rows_for(args.gib, 1)
    src, dest = _state(rows, False), _state(rows, True)
    res: dict[str, Any] = {b: {m: {"load_s": [], "warmup_s": []} for m in MODES} for b in BACKENDS}
    correct = True
    for b in BACKENDS:
        url, so = urls[b]
        t0 = time.perf_counter()
        shardckpt.save(src, url, storage_options=so, compression=None)
        res[b]["save_s"] = time.perf_counter() - t0
        log(f"{b}: saved {N_TENSORS} x [{rows}x{COLS}] fp32 in {res[b]['save_s']:.1f}s")
        for rep in range(args.warmup + args.reps):
            field = "warmup_s" if rep < args.warmup else "load_s"
            for mode in MODES:  # interleaved: on, off, on, off, ...
                s = _timed_load(dest, url, so, mode)
                ok = _all_equal(dest, src)
                correct = correct and ok
                res[b][mode][field].append(s)
                log(f"{b} {'warm-up' if field == 'warmup_s' else 'rep'} {rep} shared_reads={mode}: "
                    f"{s:6.2f}s correct={ok}")
    finish_ranks({"backends": res, "rows": rows, "world": world, "correct": correct,
                  "torch": torch.__version__, "knobs": knobs.get().__dict__}, args.out)  # fmt: skip


def report(args: argparse.Namespace, data: dict[str, Any], mach: dict[str, Any], wall: float) -> dict[str, Any]:
    import moto

    nbytes = N_TENSORS * data["rows"] * COLS * 4
    print()
    print(f"shared reads: {nbytes / (1 << 30):.2f} GiB fp32 in {N_TENSORS} replicated tensors "
          f"[{data['rows']}x{COLS}], {data['world']} gloo ranks, each loading all of it")
    print(f"machine: {mach['cpu']}, nproc {mach['nproc']}; {mach['date']}; torch {data['torch']}, "
          f"moto {moto.__version__} (own process)")
    print(f"{args.warmup} untimed + {args.reps} timed rounds per backend, interleaved on/off; "
          "medians of rank-0 barrier-to-barrier load times; GB/s = state bytes / s")
    print()
    hdr = f"{'backend':8s} {'shared_reads':12s} {'load s':>7s} {'GB/s':>7s}  {'runs (s)':24s} warm-up (s)"
    print(hdr)
    print("-" * len(hdr))
    med: dict[str, dict[str, float]] = {}
    for b in BACKENDS:
        med[b] = {}
        for m in MODES:
            r = data["backends"][b][m]
            med[b][m] = statistics.median(r["load_s"])
            runs = " ".join(f"{s:.2f}" for s in r["load_s"])
            warm = " ".join(f"{s:.2f}" for s in r["warmup_s"]) or "-"
            print(f"{b:8s} {m:12s} {med[b][m]:7.2f} {nbytes / med[b][m] / 1e9:7.3f}  {runs:24s} {warm}")
    print()
    ratios = {b: med[b]["off"] / med[b]["on"] for b in BACKENDS}
    met = ratios["s3"] >= TARGET_S3
    print(f"S3:    shared reads on / off = {ratios['s3']:.2f}x faster  "
          f"(target >= {TARGET_S3}x: {'met' if met else 'NOT MET'})")
    print(f"local: shared reads on / off = {ratios['local']:.2f}x faster  (reported only; "
          "knobs.shared_reads='auto' leaves local loads unshared)")
    print(f"saves: S3 {data['backends']['s3']['save_s']:.1f}s, local {data['backends']['local']['save_s']:.1f}s; "
          f"all loads correct: {data['correct']}; total wall time {wall:.0f}s")
    return {"args": vars(args), "machine": mach, "state_bytes": nbytes, "medians_s": med,
            "speedup_on_vs_off": ratios, "target_s3": TARGET_S3, "target_met": met,
            "all_correct": data["correct"], "wall_s": wall, **data}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=1.0, help="replicated fp32 state in GiB (default 1)")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds per backend (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed full-size rounds first (default 1)")
    ap.add_argument("--ranks", type=int, default=2, help="gloo ranks (default 2)")
    ap.add_argument("--local-dir", default=None, help="where the local checkpoint goes (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    add_worker_flags(ap)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.gib <= 0 or args.reps < 1 or args.ranks < 2 or args.warmup < 0:
        ap.error("--gib must be positive, --reps >= 1, --ranks >= 2, --warmup >= 0")

    t0 = time.perf_counter()
    full = machine()
    mach = {k: full[k] for k in ("cpu", "nproc", "python", "date")}  # this script's record
    data = run_ranks_on_s3(__file__, args.ranks, ["--gib", repr(args.gib), "--reps", str(args.reps),
                                                  "--warmup", str(args.warmup), "--local-dir", "{tmp}"],
                           "bench-shared-", tmp_dir=args.local_dir)
    result = report(args, data, mach, time.perf_counter() - t0)
    write_json(result, args.json, announce=sys.stdout)
    sys.exit(0 if result["all_correct"] else 1)


if __name__ == "__main__":
    main()
