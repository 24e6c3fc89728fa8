#!/usr/bin/env python
"""Multi-tier benchmark: local-tier save and restore vs the durable tier on S3 (moto).

    python benchmarks/bench_tiers.py [--gib 1] [--reps 3] [--json out.json]

State: ``--gib`` GiB of fp32 in 16 DTensors ``Shard(0)`` over 2 gloo ranks (one
torchrun launch of this file), each rank a "node" of its own
(``SHARDCKPT_NODE_ID``) with its own local root under /dev/shm (a RAM disk:
node-local storage at memory speed), so every local save also sends a full
replica to the other rank. The durable tier is moto's ThreadedMotoServer in
this driver process (as in ``bench_s3.py``: it does nothing else while the
ranks run).

Saves, interleaved A B C A B C ... over ``--reps`` rounds, each of a new step:

  plain async   CheckpointManager(<local disk>, async_save=True): the stall of
                ``save`` (planning + staging copy) is the reference
  local tier    CheckpointManager(s3, local_root=/dev/shm/..., async_save=True,
                persist_interval_steps=None): own shard + peer replica + commit
  remote        CheckpointManager(s3, async_save=True): the same state to S3

stall = time in ``save`` (rank 0, after a barrier); completion = stall + time in
``wait()`` until committed on every rank. Restores, interleaved L R L R ...:
``restore`` into a zeroed state from the local tier (each rank reads its own
shard) and from S3 (manager without local_root); every restore is checked
bitwise outside the timed region. Medians over ``--reps``.
Targets: local stall <= 1.1 x plain async stall; local restore >= 5 x faster
than the remote one.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from benchmarks._common import finish_ranks, write_json  # noqa: E402
from benchmarks._s3_launch import add_worker_flags, run_ranks_on_s3  # noqa: E402
from benchmarks._state import COLS, N_TENSORS, make_state, rows_for, seeded_rows  # noqa: E402

SAVES = ("plain async", "local tier", "remote")
RESTORES = ("local tier", "remote")


def _state(mesh: Any, rows: int, step: int, zero: bool = False) -> dict[str, Any]:
    """Training step ``step``'s state (``randn * 0.02``, seeded per step), or zeros to restore into."""
    import torch

    def fill(i: int, size: int, rank: int) -> Any:
        return torch.zeros(size, COLS) if zero else seeded_rows(i, size, rank, salt=7 * step).mul_(0.02)

    return {"step": step, **make_state(mesh, rows, fill)}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a["step"] == b["step"] and all(torch.equal(a[k].to_local(), b[k].to_local()) for k in a if k != "step")


def _managers(args: argparse.Namespace, rank: int) -> dict[str, Any]:
    """One CheckpointManager per way of saving (plain local disk, local tier over S3, S3 alone)."""
    import shardckpt
    from tests.s3util import storage_options_for

    opts = storage_options_for(args.endpoint)
    url = f"s3://{args.bucket}"
    local_root = os.path.join(args.shm, f"node{rank}")
    return {
        "plain async": shardckpt.CheckpointManager(os.path.join(args.tmp, "plain"), async_save=True, keep_last=1),
        "local tier": shardckpt.CheckpointManager(f"{url}/tier", local_root=local_root, local_keep_last=1,
                                                  async_save=True, storage_options=opts),
        "remote": shardckpt.CheckpointManager(f"{url}/remote", async_save=True, keep_last=1, storage_options=opts),
    }  # fmt: skip


def _save(mgr: Any, sd: dict[str, Any], step: int) -> dict[str, float]:
    """One save: the stall (time in ``save``) and the completion (committed on every rank)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    dist.barrier()
    t0 = time.perf_counter()
    mgr.save(step, sd, force=True)
    t1 = time.perf_counter()
    mgr.wait()
    dist.barrier()
    t2 = time.perf_counter()
    for t in sd.values():  # training goes on: the checkpoint must hold the values at save time
        if isinstance(t, DTensor):
            t.to_local().add_(1)
    return {"stall": t1 - t0, "done": t2 - t0}


def _restore(mgr: Any, mesh: Any, rows: int) -> tuple[float, int | None, bool]:
    """One restore into a zeroed state: (seconds, step restored, bitwise right)."""
    import torch.distributed as dist

    dest = _state(mesh, rows, 0, zero=True)
    dist.barrier()
    t0 = time.perf_counter()
    got = mgr.restore(dest)
    dist.barrier()
    t1 = time.perf_counter()
    return t1 - t0, got, got is not None and _same(dest, _state(mesh, rows, got))


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    rank = int(os.environ["RANK"])
    os.environ["SHARDCKPT_NODE_ID"] = f"bench-node{rank}"  # before the manager reads it
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    rows = rows_for(args.gib, world)
    mgrs = _managers(args, rank)
    times: dict[str, list[dict[str, float]]] = {f"save {v}": [] for v in SAVES}
    times.update({f"restore {v}": [] for v in RESTORES})
    correct = True
    step = 0
    for rep in range(args.warmup + args.reps):
        timed = rep >= args.warmup
        for v in SAVES:
            step += 1
            t = _save(mgrs[v], _state(mesh, rows, step), step)
            if timed:
                times[f"save {v}"].append(t)
        for v in RESTORES:
            s, got, ok = _restore(mgrs[v], mesh, rows)
            correct = correct and ok
            if timed:
                times[f"restore {v}"].append({"s": s})
            if rank == 0:
                print(f"[bench_tiers] round {rep}: restore {v} step {got} in {s:.2f}s ok={ok}",
                      file=sys.stderr, flush=True)
    for m in mgrs.values():
        m.close()
    flags = [None] * world
    dist.all_gather_object(flags, correct)
    finish_ranks({"times": times, "correct": all(flags), "rows": rows}, args.out)


def report(args: argparse.Namespace, data: dict[str, Any], wall: float) -> dict[str, Any]:
    t = data["times"]

    def med(name: str, field: str) -> float:
        return statistics.median(r[field] for r in t[name])

    state_gb = data["rows"] * COLS * 4 * N_TENSORS / 1e9
    print(f"multi-tier checkpoints: {state_gb:.2f} GB fp32, 2 ranks as 2 nodes, local root /dev/shm, "
          f"durable tier moto S3; {args.reps} interleaved rounds (+{args.warmup} warm-up), medians")
    print(f"{'save':<14}{'stall s':>10}{'completion s':>14}")
    for v in SAVES:
        print(f"{v:<14}{med(f'save {v}', 'stall'):>10.3f}{med(f'save {v}', 'done'):>14.2f}")
    print(f"{'restore':<14}{'s':>10}{'GB/s':>14}")
    for v in RESTORES:
        s = med(f"restore {v}", "s")
        print(f"{v:<14}{s:>10.3f}{state_gb / s:>14.2f}")
    stall_ratio = med("save local tier", "stall") / med("save plain async", "stall")
    restore_speedup = med("restore remote", "s") / med("restore local tier", "s")
    done_speedup = med("save remote", "done") / med("save local tier", "done")
    targets = {
        "local stall / plain async stall (<= 1.10)": (stall_ratio, stall_ratio <= 1.10),
        "remote restore / local restore (>= 5)": (restore_speedup, restore_speedup >= 5.0),
    }
    for name, (value, met) in targets.items():
        print(f"  {name}: {value:.2f} -> {'met' if met else 'NOT met'}")
    print(f"  remote save completion / local save completion: {done_speedup:.1f}x")
    print(f"  all restores bitwise correct: {data['correct']}; wall {wall:.0f}s")
    return {"state_gb": state_gb, "reps": args.reps, "times": t, "correct": data["correct"],
            "stall_ratio": stall_ratio, "restore_speedup": restore_speedup, "save_done_speedup": done_speedup,
            "targets_met": all(m for _, m in targets.values()), "machine": platform.processor() or platform.machine()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=1.0, help="total fp32 state in GiB (default 1)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved timed rounds (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    add_worker_flags(ap, "--tmp", "--shm")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.gib <= 0 or args.reps < 1 or args.warmup < 0:
        ap.error("--gib must be positive, --reps >= 1, --warmup >= 0")

    t0 = time.perf_counter()
    shm = tempfile.mkdtemp(prefix="bench-tiers-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        data = run_ranks_on_s3(__file__, 2, ["--gib", repr(args.gib), "--reps", str(args.reps),
                                             "--warmup", str(args.warmup), "--tmp", "{tmp}", "--shm", shm],
                               "bench-tiers-", omp_threads=1)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    result = report(args, data, time.perf_counter() - t0)
    write_json(result, args.json, announce=sys.stdout)
    sys.exit(0 if result["correct"] else 1)


if __name__ == "__main__":
    main()
