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

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # benchmark the checkout this file lives in
    sys.path.insert(0, _REPO)

N_TENSORS = 16
COLS = 1024  # each tensor is [rows, COLS] fp32; rows are sharded
SRC_WORLD = 2  # world size the checkpoints are saved with
LIBS = ("shardckpt", "dcp")  # default --libs
ALL_LIBS = ("shardckpt", "dcp", "shardckpt-zstd", "dcp-zstd", "torch-save", "torch-ckpt")
# (ours, peer) pairs whose throughput ratio is reported when both ran
PAIRS = (
    ("shardckpt", "dcp"),
    ("shardckpt-zstd", "dcp-zstd"),
    ("shardckpt-zstd", "dcp"),
    ("shardckpt", "torch-save"),
    ("shardckpt", "torch-ckpt"),
)
CHECK_TENSORS = (0, N_TENSORS - 1)
SEED = 20240611

# op -> (title, world size, target ratio or None)
OPS = {
    "save": ("save (fsync), 2 ranks", 2, 1.5),
    "load_same": ("load, same world 2 -> 2", 2, 1.2),
    "reshard_2to3": ("load, reshard 2 -> 3", 3, 1.5),
    "reshard_2to1": ("load, reshard 2 -> 1", 1, None),
}
PHASES = {"A": (2, ("save", "load_same")), "B": (3, ("reshard_2to3",)), "C": (1, ("reshard_2to1",))}


# ---------------------------------------------------------------------------
# State layout (shared by driver and workers)
# ---------------------------------------------------------------------------


def rows_for(gib: float) -> int:
    rows = int(round(gib * (1 << 30) / 4 / N_TENSORS / COLS))
    return max(rows, 6)  # at least 2 rows per rank on 3 ranks


def key(i: int) -> str:
    return f"layers.{i:02d}.weight"


def global_bytes(gib: float) -> int:
    return N_TENSORS * rows_for(gib) * COLS * 4


def ckpt_path(root: str, lib: str, run: int) -> str:
    return os.path.join(root, f"{lib}-save{run}")


# ---------------------------------------------------------------------------
# Worker side (runs under torchrun)
# ---------------------------------------------------------------------------


def _shard_bounds(rows: int, world: int, rank: int) -> tuple[int, int]:
    """(offset, size) of ``rank``'s Shard(0) slice, exactly as DTensor splits."""
    from torch.distributed.tensor import Shard

    fn = getattr(Shard, "local_shard_size_and_offset", None) or Shard._local_shard_size_and_offset
    size, offset = fn(rows, world, rank)
    return int(offset), int(size)


def _source_shard(i: int, rows: int, src_rank: int):
    """Tensor ``i``'s local shard on source rank ``src_rank`` (deterministic)."""
    import torch

    _, size = _shard_bounds(rows, SRC_WORLD, src_rank)
    g = torch.Generator().manual_seed(SEED + 1000 * src_rank + i)
    return torch.randn(size, COLS, generator=g)


def _expected_local(i: int, rows: int, world: int, rank: int):
    """What ``rank`` of ``world`` should hold for tensor ``i`` after loading."""
    import torch

    off, size = _shard_bounds(rows, world, rank)
    parts = []
    for r in range(SRC_WORLD):
        s_off, s_size = _shard_bounds(rows, SRC_WORLD, r)
        lo, hi = max(off, s_off), min(off + size, s_off + s_size)
        if lo < hi:
            parts.append(_source_shard(i, rows, r)[lo - s_off : hi - s_off])
    return torch.cat(parts) if parts else torch.empty(0, COLS)


def _make_state(mesh, rows: int, fill: Callable[[int, int, int], Any]) -> dict[str, Any]:
    import torch
    from torch.distributed.tensor import DTensor, Shard

    world, rank = mesh.size(), mesh.get_local_rank()
    sd = {}
    for i in range(N_TENSORS):
        _, size = _shard_bounds(rows, world, rank)
        local = fill(i, size, rank)
        sd[key(i)] = DTensor.from_local(
            local,
            mesh,
            [Shard(0)],
            run_check=False,
            shape=torch.Size((rows, COLS)),
            stride=(COLS, 1),
        )
    return sd


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _meminfo_cached_mib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Cached:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _drop_caches() -> dict[str, Any]:
    before = _meminfo_cached_mib()
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    after = _meminfo_cached_mib()
    return {"ok": True, "cached_before_mib": before, "cached_after_mib": after}


def _fsync_paths(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _torch_save(sd: dict[str, Any], path: str, rank: int) -> None:
    """Peer ``torch-save``: each rank writes its local shards to its own file, durably."""
    import torch

    os.makedirs(path, exist_ok=True)
    f = os.path.join(path, f"rank{rank}.pt")
    torch.save({k: v.to_local() for k, v in sd.items()}, f)
    _fsync_paths([f, path])


def _torch_load(sd: dict[str, Any], path: str, rows: int, world: int, rank: int) -> None:
    """Peer ``torch-save`` load: mmap the source ranks' files holding our rows, copy slices."""
    import torch

    off, size = _shard_bounds(rows, world, rank)
    for r in range(SRC_WORLD):
        s_off, s_size = _shard_bounds(rows, SRC_WORLD, r)
        lo, hi = max(off, s_off), min(off + size, s_off + s_size)
        if lo >= hi:
            continue
        # mmap: only the pages of the rows copied are read, as a resharding library would
        src = torch.load(
            os.path.join(path, f"rank{r}.pt"), mmap=True, weights_only=True, map_location="cpu"
        )
        for k, v in sd.items():
            v.to_local()[lo - off : hi - off].copy_(src[k][lo - s_off : hi - s_off])
        del src


def _torch_ckpt_manager() -> Any:
    """Peer ``torch-ckpt``: Meta's torch_checkpointing, synchronous, resharding, no O_DIRECT."""
    import torch.distributed as dist
    from torch_checkpointing import CheckpointManager, ItemSpec, SyncCheckpointSaverConfig
    from torch_checkpointing.default_resharder import DefaultResharder
    from torch_checkpointing.metadata_manager import DefaultMetadataManager
    from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

    def gather_on_cpu(self: Any, data: Any, process_group: Any = None) -> dict[int, Any]:
        # Upstream pads pickles into tensors on device="cuda" (fails without CUDA);
        # the same all-gather of pickled objects, on CPU.
        out: list[Any] = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(out, data, group=process_group)
        return dict(enumerate(out))

    DefaultMetadataManager._all_gather_pickled_data = gather_on_cpu
    mgr = CheckpointManager(
        CheckpointManager.Config(
            items={"model": ItemSpec(resharder=DefaultResharder())},
            save=SyncCheckpointSaverConfig(),
            storage_config=LocalFileSystemStorageConfig(use_direct_io=False),
        )
    )
    # 0.1.1's synchronous saver writes the sharding metadata only on the first save
    # (later saves get None from the metadata cache, and their checkpoints cannot be
    # resharded); recomputing it on every save is what a resharding-capable save costs.
    mm = getattr(mgr, "_metadata_manager", None)
    if mm is not None and hasattr(mm, "_should_cache_metadata"):
        mm._should_cache_metadata = False
    return mgr


def _torch_ckpt_save(mgr: Any, sd: dict[str, Any], path: str, rank: int) -> None:
    import torch.distributed as dist

    mgr.save(path, {"model": sd})
    # torch_checkpointing never fsyncs; make it as durable as the others, in the timed region
    # (file names end in _<rank>.<ext> for rank files; rank 0 also takes the shared ones).
    dist.barrier()
    mine = []
    for name in sorted(os.listdir(path)):
        stem = os.path.splitext(name)[0]
        owner = int(stem.rsplit("_", 1)[1]) if stem.rsplit("_", 1)[-1].isdigit() else 0
        if owner == rank:
            mine.append(os.path.join(path, name))
    _fsync_paths(mine + ([path] if rank == 0 else []))


def worker(args: argparse.Namespace) -> None:
    import warnings

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.device_mesh import init_device_mesh

    import shardckpt

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed.checkpoint")

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    want_world, ops = PHASES[args.phase]
    if world != want_world:
        raise SystemExit(f"phase {args.phase} needs {want_world} ranks, got {world}")
    mesh = init_device_mesh("cpu", (world,))
    rows = rows_for(args.gib)
    root = args.dir

    def log(msg: str) -> None:
        if rank == 0:
            print(f"[phase {args.phase} | {world} rank(s)] {msg}", file=sys.stderr, flush=True)

    def timed(fn: Callable[..., None], *fn_args: Any) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn(*fn_args)
        dist.barrier()
        return time.perf_counter() - t0

    def all_ok(flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    from torch.distributed.checkpoint._extension import ZStandard

    LIBS = tuple(args.libs)  # noqa: N806 - the run's libraries, in interleaving order
    tc_mgr = _torch_ckpt_manager() if "torch-ckpt" in LIBS else None
    savers = {
        "shardckpt": lambda sd, p: shardckpt.save(sd, p),
        "dcp": lambda sd, p: dcp.save(sd, storage_writer=FileSystemWriter(p, sync_files=True)),
        "shardckpt-zstd": lambda sd, p: shardckpt.save(sd, p, compression="zstd"),
        "dcp-zstd": lambda sd, p: dcp.save(
            sd, storage_writer=FileSystemWriter(p, sync_files=True, _extensions=[ZStandard()])
        ),
        "torch-save": lambda sd, p: _torch_save(sd, p, rank),
        "torch-ckpt": lambda sd, p: _torch_ckpt_save(tc_mgr, sd, p, rank),
    }
    loaders = {
        "shardckpt": lambda sd, p: shardckpt.load(sd, p),
        "dcp": lambda sd, p: dcp.load(sd, storage_reader=FileSystemReader(p)),
        "shardckpt-zstd": lambda sd, p: shardckpt.load(sd, p),
        "dcp-zstd": lambda sd, p: dcp.load(sd, storage_reader=FileSystemReader(p)),
        "torch-save": lambda sd, p: _torch_load(sd, p, rows, world, rank),
        "torch-ckpt": lambda sd, p: tc_mgr.load(p, into={"model": sd}),
    }
    n_runs = args.warmup + args.repeats  # run j < args.warmup is an untimed warm-up
    last = {lib: ckpt_path(root, lib, n_runs - 1) for lib in LIBS}
    results: dict[str, Any] = {
        "phase": args.phase,
        "world": world,
        "torch_threads": torch.get_num_threads(),
        "times": {},
        "warmup_times": {},
        "correct": {},
        "drop_caches": [],
    }

    if "save" in ops:
        t_build = time.perf_counter()
        src = _make_state(mesh, rows, lambda i, size, r: _source_shard(i, rows, r))
        log(f"built source state ({time.perf_counter() - t_build:.1f}s); timing saves")
        times: dict[str, list[float]] = {lib: [] for lib in LIBS}
        warm: dict[str, list[float]] = {lib: [] for lib in LIBS}
        for run in range(n_runs):
            for lib in LIBS:
                path = ckpt_path(root, lib, run)
                if rank == 0:  # outside the timed region: fresh target, previous run gone
                    if run > 0:
                        shutil.rmtree(ckpt_path(root, lib, run - 1), ignore_errors=True)
                    shutil.rmtree(path, ignore_errors=True)
                    os.sync()
                dist.barrier()
                t = timed(savers[lib], src, path)
                (warm if run < args.warmup else times)[lib].append(t)
                log(f"save {lib:9s} {'warm-up' if run < args.warmup else 'run'} {run}: {t:.3f}s")
        results["times"]["save"] = times
        results["warmup_times"]["save"] = warm
        if rank == 0:
            results["sizes"] = {lib: _tree_bytes(last[lib]) for lib in LIBS}
        del src

    load_op = next((op for op in ops if op != "save"), None)
    if load_op is not None:
        dest = _make_state(mesh, rows, lambda i, size, r: torch.zeros(size, COLS))
        expected = {i: _expected_local(i, rows, world, rank) for i in CHECK_TENSORS}
        times = {lib: [] for lib in LIBS}
        warm = {lib: [] for lib in LIBS}
        correct = {lib: True for lib in LIBS}
        log(f"timing loads ({load_op})")
        for run in range(n_runs):
            for lib in LIBS:
                for i in CHECK_TENSORS:
                    dest[key(i)].to_local().fill_(float("nan"))
                if args.drop_caches and rank == 0:
                    results["drop_caches"].append(_drop_caches())
                t = timed(loaders[lib], dest, last[lib])
                ok = all(torch.equal(dest[key(i)].to_local(), expected[i]) for i in CHECK_TENSORS)
                ok = all_ok(ok)
                correct[lib] = correct[lib] and ok
                (warm if run < args.warmup else times)[lib].append(t)
                log(
                    f"load {lib:9s} {'warm-up' if run < args.warmup else 'run'} {run}: {t:.3f}s  correct={ok}"
                )
        results["times"][load_op] = times
        results["warmup_times"][load_op] = warm
        results["correct"][load_op] = correct

    from shardckpt.native import crc32c as _checksum

    impl = getattr(_checksum, "implementation", None)
    mine = impl() if impl else "unknown (no shardckpt.native.crc32c.implementation)"
    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine)  # every rank's, in case one fell back to software
    if tc_mgr is not None:
        tc_mgr.close()
    if rank == 0:
        results["crc"] = sorted(set(every))
        with open(args.out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def run_phase(phase: str, args: argparse.Namespace, root: str) -> dict[str, Any]:
    nproc = PHASES[phase][0]
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
        "--warmup",
        str(args.warmup),
        "--dir",
        root,
        "--out",
        out,
        "--libs",
        ",".join(args.libs),
    ] + (["--drop-caches"] if args.drop_caches else [])
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    env["PYTHONPATH"] = _REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    # Worker chatter goes to stderr so stdout carries only the report.
    subprocess.run(cmd, check=True, stdout=sys.stderr, env=env)
    with open(out) as f:
        res = json.load(f)
    res["wall_s"] = time.perf_counter() - t0
    return res


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]], total_s: float) -> bool:
    import torch

    gb = global_bytes(args.gib)
    rows = rows_for(args.gib)
    crcs = sorted({c for r in results.values() for c in r.get("crc", [])})
    crc = (
        crcs[0] + " (every rank of every phase)"
        if len(crcs) == 1
        else "MIXED across ranks/phases: " + ", ".join(crcs)
    )
    print()
    print(
        f"shardckpt vs torch.distributed.checkpoint -- {gb / (1 << 30):.2f} GiB fp32 ({gb} B) in "
        f"{N_TENSORS} DTensors [{rows}x{COLS}] Shard(0), saved by {SRC_WORLD} gloo ranks on CPU"
    )
    print(
        f"torch {torch.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} CPU(s); "
        f"{args.warmup} untimed warm-up + {args.repeats} timed runs per library, interleaved; "
        "times are rank 0 barrier-to-barrier, medians"
    )
    print(f"CRC32C implementation: {crc}")
    print(
        "DCP: FileSystemWriter(sync_files=True) / FileSystemReader; shardckpt: save()/load() defaults"
    )
    if args.drop_caches:
        drops = [d for r in results.values() for d in r.get("drop_caches", [])]
        bad = [d for d in drops if not d.get("ok")]
        if bad:
            print(f"page cache: --drop-caches FAILED ({bad[0].get('error')}); loads are warm")
        else:
            freed = [
                d["cached_before_mib"] - d["cached_after_mib"]
                for d in drops
                if d.get("cached_before_mib") is not None and d.get("cached_after_mib") is not None
            ]
            print(
                f"page cache: dropped before each of {len(drops)} loads, warm-ups included (worked; 'Cached' fell by "
                f"{min(freed):.0f}-{max(freed):.0f} MiB each time); a VM host may still cache the disk"
            )
    else:
        print(
            "page cache: warm (loads right after saves read from the page cache for both libraries)"
        )
    print()
    hdr = f"{'operation':26s} {'lib':14s} {'median s':>9s} {'GB/s':>7s} {'warm-up s':>9s}  {'timed runs (s)':s}"
    print(hdr)
    print("-" * max(len(hdr), 78))
    LIBS = tuple(args.libs)  # noqa: N806
    ratios = []
    all_correct = True
    for op, (title, _, target) in OPS.items():
        res = next((r for r in results.values() if op in r["times"]), None)
        if res is None:
            continue
        med = {}
        for lib in LIBS:
            ts = res["times"][op][lib]
            med[lib] = statistics.median(ts)
            ws = (
                " ".join(f"{t:.3f}" for t in res.get("warmup_times", {}).get(op, {}).get(lib, []))
                or "-"
            )
            ok = res["correct"].get(op, {}).get(lib)
            flag = "" if ok is None else ("  correct" if ok else "  WRONG DATA")
            all_correct = all_correct and ok is not False
            print(
                f"{title if lib == LIBS[0] else '':26s} {lib:14s} {med[lib]:9.3f} {gb / med[lib] / 1e9:7.2f} {ws:>9s}  "
                + " ".join(f"{t:.3f}" for t in ts)
                + flag
            )
        for ours, peer in PAIRS:
            if ours in med and peer in med:
                tgt = target if (ours, peer) == ("shardckpt", "dcp") else None
                ratios.append((f"{title} [{ours} / {peer}]", med[peer] / med[ours], tgt))
    sizes = next((r["sizes"] for r in results.values() if "sizes" in r), None)
    if sizes:
        print()
        print("checkpoint size on disk: " + ", ".join(
            f"{lib} {sizes[lib] / 1e9:.3f} GB ({gb / sizes[lib]:.3f}x)" for lib in LIBS))
    print()
    print("ratio = ours throughput / peer throughput (= peer median / ours median)")
    met = True
    for title, ratio, target in ratios:
        if target is None:
            verdict = "(reported only)"
        else:
            verdict = f"target >= {target:.1f}x  {'MET' if ratio >= target else 'MISSED'}"
            met = met and ratio >= target
        print(f"  {title:52s} {ratio:5.2f}x   {verdict}")
    print()
    phase_walls = ", ".join(f"{p}: {r['wall_s']:.0f}s" for p, r in results.items())
    print(f"total wall time {total_s:.0f}s (phases incl. launch: {phase_walls})")
    if not all_correct:
        print("ERROR: a load produced wrong data (see WRONG DATA above)")
    return all_correct


def summary(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run as JSON-ready data: per operation and library, median s and GB/s; ratios."""
    gb = global_bytes(args.gib)
    ops: dict[str, Any] = {}
    ratios: dict[str, dict[str, float]] = {}
    for op in OPS:
        res = next((r for r in results.values() if op in r["times"]), None)
        if res is None:
            continue
        ops[op] = {}
        for lib in args.libs:
            ts = res["times"][op][lib]
            med = statistics.median(ts)
            ops[op][lib] = {
                "median_s": med,
                "gbps": gb / med / 1e9,
                "times_s": ts,
                "warmup_s": res.get("warmup_times", {}).get(op, {}).get(lib, []),
                "correct": res.get("correct", {}).get(op, {}).get(lib),
            }
        ratios[op] = {
            f"{ours}/{peer}": ops[op][peer]["median_s"] / ops[op][ours]["median_s"]
            for ours, peer in PAIRS
            if ours in ops[op] and peer in ops[op]
        }
    return {
        "gib": args.gib,
        "global_bytes": gb,
        "world_save": SRC_WORLD,
        "libs": list(args.libs),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "ops": ops,
        "ratios": ratios,
        "sizes_on_disk": next((r["sizes"] for r in results.values() if "sizes" in r), None),
        "crc": sorted({c for r in results.values() for c in r.get("crc", [])}),
        "wall_s": {p: r.get("wall_s") for p, r in results.items()},
    }


def main() -> None:
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
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    root = tempfile.mkdtemp(prefix="shardckpt-bench-", dir=args.dir)
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
    ok = report(args, results, time.perf_counter() - t0)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary(args, results), f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
