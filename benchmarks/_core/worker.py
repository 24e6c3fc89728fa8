"""One phase of ``bench_core.py`` on every rank (under torchrun): timed saves, then loads.

Saves (phase A): every library saves the source state ``--warmup + --repeats``
times, interleaved A B A B ..., each to a fresh directory (the previous run's is
deleted outside the timed region; the last of each library is kept for the loads).
Loads: into preallocated DTensors at this phase's world size, interleaved the same
way, the first and last tensors poisoned before and checked after every call.
Rank 0 writes the phase's JSON (``args.out``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from benchmarks._common import all_ranks, barrier_timed, finish_ranks, quiet_warnings, rank0_logger
from benchmarks._core import CHECK_TENSORS, PHASES
from benchmarks._core.peers import (
    drop_caches,
    torch_ckpt_manager,
    torch_ckpt_save,
    torch_load,
    torch_save,
    tree_bytes,
)
from benchmarks._state import COLS, expected_local, key, make_state, rows_for, source_shard

__all__ = ["ckpt_path", "worker"]

Op = Callable[[dict[str, Any], str], Any]


def ckpt_path(root: str, lib: str, run: int) -> str:
    return os.path.join(root, f"{lib}-save{run}")


def _contenders(rows: int, world: int, rank: int, tc_mgr: Any) -> tuple[dict[str, Op], dict[str, Op]]:
    """(savers, loaders): library -> fn(state_dict, path), every library of ``ALL_LIBS``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint._extension import ZStandard

    import shardckpt

    savers: dict[str, Op] = {
        "shardckpt": lambda sd, p: shardckpt.save(sd, p),
        "dcp": lambda sd, p: dcp.save(sd, storage_writer=FileSystemWriter(p, sync_files=True)),
        "shardckpt-zstd": lambda sd, p: shardckpt.save(sd, p, compression="zstd"),
        "dcp-zstd": lambda sd, p: dcp.save(
            sd, storage_writer=FileSystemWriter(p, sync_files=True, _extensions=[ZStandard()])
        ),
        "torch-save": lambda sd, p: torch_save(sd, p, rank),
        "torch-ckpt": lambda sd, p: torch_ckpt_save(tc_mgr, sd, p, rank),
    }
    loaders: dict[str, Op] = {
        "shardckpt": lambda sd, p: shardckpt.load(sd, p),
        "dcp": lambda sd, p: dcp.load(sd, storage_reader=FileSystemReader(p)),
        "shardckpt-zstd": lambda sd, p: shardckpt.load(sd, p),
        "dcp-zstd": lambda sd, p: dcp.load(sd, storage_reader=FileSystemReader(p)),
        "torch-save": lambda sd, p: torch_load(sd, p, rows, world, rank),
        "torch-ckpt": lambda sd, p: tc_mgr.load(p, into={"model": sd}),
    }
    return savers, loaders


def _time_saves(args: argparse.Namespace, mesh: Any, savers: dict[str, Op], libs: tuple[str, ...],
                results: dict[str, Any], log: Callable[[str], None]) -> None:  # fmt: skip
    """Phase A's saves, into ``results``: times, warm-up times, and (rank 0) sizes on disk."""
    import torch.distributed as dist

    rank, rows, root = dist.get_rank(), rows_for(args.gib), args.dir
    n_runs = args.warmup + args.repeats  # run j < args.warmup is an untimed warm-up
    t_build = time.perf_counter()
    src = make_state(mesh, rows, lambda i, size, r: source_shard(i, rows, r))
    log(f"built source state ({time.perf_counter() - t_build:.1f}s); timing saves")
    times: dict[str, list[float]] = {lib: [] for lib in libs}
    warm: dict[str, list[float]] = {lib: [] for lib in libs}
    for run in range(n_runs):
        for lib in libs:
            path = ckpt_path(root, lib, run)
            if rank == 0:  # outside the timed region: fresh target, previous run gone
                if run > 0:
                    shutil.rmtree(ckpt_path(root, lib, run - 1), ignore_errors=True)
                shutil.rmtree(path, ignore_errors=True)
                os.sync()
            dist.barrier()
            t = barrier_timed(savers[lib], src, path)
            (warm if run < args.warmup else times)[lib].append(t)
            log(f"save {lib:9s} {'warm-up' if run < args.warmup else 'run'} {run}: {t:.3f}s")
    results["times"]["save"] = times
    results["warmup_times"]["save"] = warm
    if rank == 0:
        results["sizes"] = {lib: tree_bytes(ckpt_path(root, lib, n_runs - 1)) for lib in libs}


def _time_loads(args: argparse.Namespace, mesh: Any, load_op: str, loaders: dict[str, Op],
                libs: tuple[str, ...], results: dict[str, Any],
                log: Callable[[str], None]) -> None:  # fmt: skip
    """A load phase, into ``results``: times, warm-up times, and whether every load was right."""
    import torch
    import torch.distributed as dist

    rank, world, rows = dist.get_rank(), dist.get_world_size(), rows_for(args.gib)
    n_runs = args.warmup + args.repeats
    dest = make_state(mesh, rows, lambda i, size, r: torch.zeros(size, COLS))
    expected = {i: expected_local(i, rows, world, rank) for i in CHECK_TENSORS}
    times: dict[str, list[float]] = {lib: [] for lib in libs}
    warm: dict[str, list[float]] = {lib: [] for lib in libs}
    correct = {lib: True for lib in libs}
    log(f"timing loads ({load_op})")
    for run in range(n_runs):
        for lib in libs:
            for i in CHECK_TENSORS:
                dest[key(i)].to_local().fill_(float("nan"))
            if args.drop_caches and rank == 0:
                results["drop_caches"].append(drop_caches())
            t = barrier_timed(loaders[lib], dest, ckpt_path(args.dir, lib, n_runs - 1))
            ok = all(torch.equal(dest[key(i)].to_local(), expected[i]) for i in CHECK_TENSORS)
            ok = all_ranks(ok)
            correct[lib] = correct[lib] and ok
            (warm if run < args.warmup else times)[lib].append(t)
            log(f"load {lib:9s} {'warm-up' if run < args.warmup else 'run'} {run}: {t:.3f}s  correct={ok}")
    results["times"][load_op] = times
    results["warmup_times"][load_op] = warm
    results["correct"][load_op] = correct


def _crc_implementations() -> list[str]:
    """Every rank's CRC32C implementation (in case one fell back to software), sorted, unique."""
    import torch.distributed as dist

    from shardckpt.native import crc32c as _checksum

    impl = getattr(_checksum, "implementation", None)
    mine = impl() if impl else "unknown (no shardckpt.native.crc32c.implementation)"
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return sorted(set(every))


def worker(args: argparse.Namespace) -> None:
    """Phase ``args.phase`` on this rank; rank 0 writes the results to ``args.out``."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    quiet_warnings()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    want_world, ops = PHASES[args.phase]
    if world != want_world:
        raise SystemExit(f"phase {args.phase} needs {want_world} ranks, got {world}")
    mesh = init_device_mesh("cpu", (world,))
    log = rank0_logger(f"phase {args.phase} | {world} rank(s)")
    libs = tuple(args.libs)  # the run's libraries, in interleaving order
    tc_mgr = torch_ckpt_manager() if "torch-ckpt" in libs else None
    savers, loaders = _contenders(rows_for(args.gib), world, rank, tc_mgr)
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
        _time_saves(args, mesh, savers, libs, results, log)
    load_op = next((op for op in ops if op != "save"), None)
    if load_op is not None:
        _time_loads(args, mesh, load_op, loaders, libs, results, log)
    results["crc"] = _crc_implementations()
    if tc_mgr is not None:
        tc_mgr.close()
    finish_ranks(results, args.out)
