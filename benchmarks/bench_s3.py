#!/usr/bin/env python
"""S3 benchmark: shardckpt (raw, auto) vs DCP's fsspec backend vs a raw-S3 ceiling.

    python benchmarks/bench_s3.py [--gib 1] [--reps 3] [--ranks 2] [--json out.json]

State: ``--gib`` GiB of fp32 in 16 DTensors ``Shard(0)`` over ``--ranks`` gloo ranks
(one torchrun launch of this file); each rank builds only its local shards, seeded
``randn * 0.02`` (weight-scaled normal values: full-entropy low mantissa bits, so
they compress only a little; the measured ratio is printed -- real fp32 weights,
e.g. MiniLM, compress about 1.2x).

The S3 endpoint is moto's ThreadedMotoServer (tests/s3util.py), started in *this*
driver process, which does nothing else while the ranks run: the server is the
bottleneck, and it must not share a GIL with a rank.

Variants, interleaved A B C D A B C D ... over ``--reps`` rounds, each saved to a
fresh prefix, loaded back at the same world size into a zeroed state, checked
(every tensor compared, outside the timed region), then deleted:

  shardckpt raw   shardckpt.save(compression=None) / shardckpt.load
  shardckpt auto  shardckpt.save() default (byte-grouped zstd on S3) / shardckpt.load
  DCP fsspec      dcp.save(FsspecWriter(url, sync_files=False, **opts)) / dcp.load(FsspecReader)
                  (sync_files=False: an S3 object is durable at close; True would only
                  make DCP run os.sync() on the local disk, as s3fs files have no fileno)
  raw ceiling     no checkpoint logic: each rank PUTs its shard bytes as one object per
                  tensor (same sizes) in one parallel ``fs.pipe``, and GETs them back
                  whole in one parallel ``fs.cat``, then copies them into the tensors

Timing (rank 0): barrier, t0, operation, barrier, t1. Medians over ``--reps``; GB/s
is *logical* state bytes / seconds (1 GB = 1e9 B) for every variant. Before the
timed rounds every variant does one untimed save+load of a tiny state (connections,
imports, first calls), then ``--warmup`` (default 1) untimed full-size rounds,
interleaved the same way, whose times are shown apart. CPU seconds used during each operation are recorded for
the ranks (sum) and for the moto server process, to show where the time goes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # benchmark the checkout this file lives in
    sys.path.insert(0, _REPO)

from benchmarks._common import (  # noqa: E402
    all_ranks,
    finish_ranks,
    machine,
    quiet_warnings,
    rank0_logger,
    write_json,
)
from benchmarks._s3_launch import add_worker_flags, run_ranks_on_s3  # noqa: E402
from benchmarks._state import COLS, N_TENSORS, key, make_state, rows_for, seeded_rows  # noqa: E402

VARIANTS = ("shardckpt raw", "shardckpt auto", "DCP fsspec", "raw ceiling")
# (title, ours, peer, op, target): throughput ratio ours / peer
TARGETS = (
    ("shardckpt raw save / ceiling", "shardckpt raw", "raw ceiling", "save", 0.9),
    ("shardckpt raw load / ceiling", "shardckpt raw", "raw ceiling", "load", 0.9),
    ("shardckpt auto save (logical) / ceiling", "shardckpt auto", "raw ceiling", "save", 1.1),
    ("shardckpt auto load (logical) / ceiling", "shardckpt auto", "raw ceiling", "load", 1.1),
    ("shardckpt raw load / DCP load", "shardckpt raw", "DCP fsspec", "load", 2.0),
    ("shardckpt auto load / DCP load", "shardckpt auto", "DCP fsspec", "load", 2.0),
    ("shardckpt raw save / DCP save", "shardckpt raw", "DCP fsspec", "save", None),
    ("shardckpt auto save / DCP save", "shardckpt auto", "DCP fsspec", "save", None),
)
Op = Callable[[dict[str, Any], str], Any]


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------
# Worker (one per rank, under torchrun)
# ---------------------------------------------------------------------------


def _state(mesh: Any, rows: int, zero: bool) -> dict[str, Any]:
    """The state (weight-scaled ``randn * 0.02``), or zeros of its shape to load into."""
    import torch

    if zero:
        return make_state(mesh, rows, lambda i, size, r: torch.zeros(size, COLS))
    return make_state(mesh, rows, lambda i, size, r: seeded_rows(i, size, r).mul_(0.02))


def _ceiling(fs: Any, rank: int) -> tuple[Op, Op]:
    """The raw ceiling: one object per tensor, PUT in one parallel ``fs.pipe``, GET in one ``fs.cat``."""
    import numpy as np

    def paths(url: str) -> list[str]:
        base = url.split("://", 1)[1]
        return [f"{base}/rank{rank}/{key(i)}" for i in range(N_TENSORS)]

    def save(sd: dict[str, Any], url: str) -> None:
        fs.pipe({p: sd[key(i)].to_local().numpy().tobytes() for i, p in enumerate(paths(url))})

    def load(sd: dict[str, Any], url: str) -> None:
        names = paths(url)
        got = fs.cat(names)  # one parallel batch of whole-object GETs
        for i, p in enumerate(names):
            sd[key(i)].to_local().numpy().reshape(-1).view(np.uint8)[:] = np.frombuffer(got.pop(p), np.uint8)

    return save, load


def _ops(opts: dict[str, Any], fs: Any, rank: int) -> dict[str, tuple[Op, Op]]:
    """variant -> (save, load), each ``fn(state_dict, url)``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    import shardckpt

    return {
        "shardckpt raw": (
            lambda sd, u: shardckpt.save(sd, u, storage_options=opts, compression=None),
            lambda sd, u: shardckpt.load(sd, u, storage_options=opts)),
        "shardckpt auto": (
            lambda sd, u: shardckpt.save(sd, u, storage_options=opts, compression="auto"),
            lambda sd, u: shardckpt.load(sd, u, storage_options=opts)),
        "DCP fsspec": (
            lambda sd, u: dcp.save(sd, storage_writer=FsspecWriter(u, sync_files=False, **opts)),
            lambda sd, u: dcp.load(sd, storage_reader=FsspecReader(u, **opts))),
        "raw ceiling": _ceiling(fs, rank),
    }  # fmt: skip


def _timed(fn: Op, sd: dict[str, Any], url: str, server_pid: int) -> dict[str, float]:
    """Barrier-to-barrier seconds, and the CPU seconds of all ranks and of the moto server."""
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()

    def cpu_now() -> tuple[float, float]:
        return time.process_time(), _proc_cpu_s(server_pid) if rank == 0 else 0.0

    dist.barrier()
    c0, s0 = cpu_now()
    t0 = time.perf_counter()
    fn(sd, url)
    dist.barrier()
    t = time.perf_counter() - t0
    c1, s1 = cpu_now()
    cpu = torch.tensor([c1 - c0], dtype=torch.float64)
    dist.all_reduce(cpu)
    return {"s": t, "rank_cpu_s": float(cpu.item()), "server_cpu_s": s1 - s0}


def _stored_and_delete(fs: Any, url: str) -> tuple[int, int, int]:
    """Rank 0: (bytes, objects, largest) stored under ``url``, then delete them all."""
    import torch.distributed as dist

    n = count = largest = 0
    if dist.get_rank() == 0:
        base = url.split("://", 1)[1]
        bucket, prefix = base.split("/", 1)
        fs.invalidate_cache()
        found = fs.find(base, detail=True)
        sizes = [int(d["size"]) for d in found.values()]
        n, count, largest = sum(sizes), len(sizes), max(sizes, default=0)
        if found:
            fs.rm(list(found), recursive=False)
        ups = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix + "/")
        for u in ups.get("Uploads") or []:
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
        fs.invalidate_cache()
        if fs.find(base):
            raise RuntimeError(f"{url}: objects left after delete")
    dist.barrier()
    return n, count, largest


def _all_equal(dest: dict[str, Any], src: dict[str, Any]) -> bool:
    import torch

    return all_ranks(all(torch.equal(dest[k].to_local(), src[k].to_local()) for k in src))


def _warm_up(ops: dict[str, tuple[Op, Op]], fs: Any, mesh: Any, bucket: str) -> None:
    """Untimed, on a tiny state: every variant saves, loads and checks once."""
    world = mesh.size()
    tiny_src, tiny_dst = _state(mesh, 8 * world, False), _state(mesh, 8 * world, True)
    for v in VARIANTS:
        url = f"s3://{bucket}/warmup-{v.replace(' ', '-')}"
        ops[v][0](tiny_src, url)
        ops[v][1](tiny_dst, url)
        if not _all_equal(tiny_dst, tiny_src):
            raise SystemExit(f"warm-up: {v} loaded wrong data")
        _stored_and_delete(fs, url)


def _rounds(args: argparse.Namespace, ops: dict[str, tuple[Op, Op]], fs: Any, src: dict[str, Any],
            dest: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """``--warmup`` + ``--reps`` rounds of every variant: save, load, check, measure, delete."""
    res: dict[str, Any] = {v: {"save": [], "load": [], "warmup_save": [], "warmup_load": [],
                               "stored_bytes": [], "objects": 0, "largest_object": 0, "correct": True}
                           for v in VARIANTS}  # fmt: skip
    for rep in range(args.warmup + args.reps):
        pre = "warmup_" if rep < args.warmup else ""
        for v in VARIANTS:
            url = f"s3://{args.bucket}/{v.replace(' ', '-')}-r{rep}"
            r = res[v]
            r[pre + "save"].append(_timed(ops[v][0], src, url, args.server_pid))
            for t in dest.values():
                t.to_local().zero_()
            r[pre + "load"].append(_timed(ops[v][1], dest, url, args.server_pid))
            ok = _all_equal(dest, src)
            r["correct"] = r["correct"] and ok
            stored, r["objects"], r["largest_object"] = _stored_and_delete(fs, url)
            r["stored_bytes"].append(stored)
            log(f"{'warm-up' if pre else 'rep'} {rep} {v:14s} save {r[pre + 'save'][-1]['s']:7.2f}s  "
                f"load {r[pre + 'load'][-1]['s']:7.2f}s  stored {stored / 1e9:.3f} GB  correct={ok}")
    return res


def worker(args: argparse.Namespace) -> None:
    """This rank's part of the run; rank 0 writes every variant's times to ``--out``."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from shardckpt import knobs
    from tests.s3util import make_fs, storage_options_for

    quiet_warnings()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    opts = storage_options_for(args.endpoint)
    fs = make_fs(opts)  # our own s3fs instance: ceiling I/O, sizes, deletes
    ops = _ops(opts, fs, rank)
    log = rank0_logger("bench_s3")
    _warm_up(ops, fs, mesh, args.bucket)
    log("warm-up done")
    rows = rows_for(args.gib, world)
    t_build = time.perf_counter()
    src, dest = _state(mesh, rows, False), _state(mesh, rows, True)
    log(f"built state [{N_TENSORS} x {rows}x{COLS}] fp32 ({time.perf_counter() - t_build:.1f}s)")
    res = _rounds(args, ops, fs, src, dest, log)
    finish_ranks({"variants": res, "rows": rows, "world": world, "torch": torch.__version__,
                  "knobs": knobs.get().__dict__, "torch_threads": torch.get_num_threads()}, args.out)  # fmt: skip


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def _med(rows: list[dict[str, float]], field: str = "s") -> float:
    return statistics.median(r[field] for r in rows)


def _runs(rows: list[dict[str, float]]) -> str:
    return " ".join(f"{r['s']:.2f}" for r in rows)


def report(args: argparse.Namespace, data: dict[str, Any], mach: dict[str, Any],
           wall: float, server_rss_mib: float) -> dict[str, Any]:
    import moto
    import s3fs

    gb = N_TENSORS * data["rows"] * COLS * 4
    res = data["variants"]
    print()
    print(f"shardckpt on S3 (moto {moto.__version__} ThreadedMotoServer on loopback, own process) -- "
          f"{gb / (1 << 30):.2f} GiB fp32 ({gb} B) in {N_TENSORS} DTensors [{data['rows']}x{COLS}] "
          f"Shard(0), {data['world']} gloo ranks")
    print(f"machine: {mach['cpu']}, nproc {mach['nproc']} (cpu_count {mach['cpu_count']}); {mach['date']}")
    print(f"torch {data['torch']}, s3fs {s3fs.__version__}, python {mach['python']}; "
          f"{args.warmup} untimed full-size + {args.reps} timed rounds, interleaved; "
          "medians of rank-0 barrier-to-barrier times")
    k = data["knobs"]
    print(f"shardckpt knobs: part_bytes {k['part_bytes'] >> 20} MiB x {k['upload_concurrency']} uploads, "
          f"read_part_bytes {k['read_part_bytes'] >> 20} MiB x {k['read_concurrency']} GETs, "
          f"io_threads {k['io_threads']}, chunk_bytes {k['chunk_bytes'] >> 20} MiB")
    print("GB/s = logical state bytes / s (1 GB = 1e9 B); stored GB = bytes in the bucket")
    print()
    hdr = (f"{'variant':15s} {'save s':>7s} {'save GB/s':>9s} {'load s':>7s} {'load GB/s':>9s} "
           f"{'stored GB':>9s} {'ratio':>6s}  {'save runs (s)':18s} {'load runs (s)':18s} {'warm-up s/l':11s}")
    print(hdr)
    print("-" * len(hdr))
    med: dict[str, dict[str, float]] = {}
    for v in VARIANTS:
        r = res[v]
        m = med[v] = {"save": _med(r["save"]), "load": _med(r["load"])}
        stored = statistics.median(r["stored_bytes"])
        m["stored_bytes"] = stored
        flag = "" if r["correct"] else "  WRONG DATA"
        print(f"{v:15s} {m['save']:7.2f} {gb / m['save'] / 1e9:9.3f} {m['load']:7.2f} "
              f"{gb / m['load'] / 1e9:9.3f} {stored / 1e9:9.3f} {gb / stored:5.3f}x  "
              f"{_runs(r['save']):18s} {_runs(r['load']):18s} "
              f"{_runs(r['warmup_save']) or '-'}/{_runs(r['warmup_load']) or '-'}{flag}")
    print()
    print("CPU seconds during each timed operation (medians): ranks (sum over ranks) / moto server process")
    for v in VARIANTS:
        r = res[v]
        print(f"  {v:15s} save {_med(r['save'], 'rank_cpu_s'):6.1f} / {_med(r['save'], 'server_cpu_s'):6.1f}"
              f"    load {_med(r['load'], 'rank_cpu_s'):6.1f} / {_med(r['load'], 'server_cpu_s'):6.1f}")
    print(f"  moto server peak RSS {server_rss_mib:.0f} MiB")
    print("objects per checkpoint (largest): " + ", ".join(
        f"{v} {res[v]['objects']} ({res[v]['largest_object'] / 2**20:.0f} MiB)" for v in VARIANTS))
    auto = med["shardckpt auto"]
    print()
    print(f"shardckpt auto stored {auto['stored_bytes'] / 1e9:.3f} GB: compression ratio "
          f"{gb / auto['stored_bytes']:.3f}x on randn*0.02 fp32 (real fp32 weights, e.g. MiniLM: ~1.2x)")
    print()
    print("ratio = ours throughput / peer throughput (= peer median s / ours median s)")
    ratios = []
    for title, ours, peer, op, target in TARGETS:
        ratio = med[peer][op] / med[ours][op]
        if target is None:
            verdict = "(reported only)"
        else:
            verdict = f"target >= {target:.1f}x  {'met' if ratio >= target else 'NOT MET'}"
        print(f"  {title:42s} {ratio:5.2f}x   {verdict}")
        ratios.append({"title": title, "ours": ours, "peer": peer, "op": op, "ratio": ratio,
                       "target": target, "met": None if target is None else ratio >= target})
    correct = all(res[v]["correct"] for v in VARIANTS)
    print()
    print(f"total wall time {wall:.0f}s; all loads correct: {correct}")
    return {"args": vars(args), "machine": mach, "state_bytes": gb, "medians_s": med,
            "ratios": ratios, "all_correct": correct, "wall_s": wall,
            "server_peak_rss_mib": server_rss_mib, **data}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=1.0, help="total fp32 state in GiB (default 1)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved timed rounds (default 3)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed full-size rounds before the timed ones (default 1)")
    ap.add_argument("--ranks", type=int, default=2, help="gloo ranks (default 2)")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    add_worker_flags(ap)
    ap.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.gib <= 0 or args.reps < 1 or args.ranks < 1 or args.warmup < 0:
        ap.error("--gib must be positive, --reps and --ranks >= 1, --warmup >= 0")

    import resource

    t0 = time.perf_counter()
    mach = machine()
    data = run_ranks_on_s3(__file__, args.ranks, ["--gib", repr(args.gib), "--reps", str(args.reps),
                                                  "--warmup", str(args.warmup), "--server-pid", str(os.getpid())],
                           "bench-s3-")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = report(args, data, mach, time.perf_counter() - t0, rss)
    write_json(result, args.json, announce=sys.stdout)
    sys.exit(0 if result["all_correct"] else 1)


if __name__ == "__main__":
    main()
