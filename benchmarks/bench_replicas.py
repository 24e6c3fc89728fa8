#!/usr/bin/env python
"""Cost of the replica divergence check (``check_replicas``), same run.

    python benchmarks/bench_replicas.py [--gib 1] [--repeats 5] [--dir /tmp/x]

Two gloo ranks (one torchrun launch of this file), two states of ``--gib`` GiB of
fp32 in 16 tensors:

* ``sharded``: bench_core's shape (``Shard(0)`` DTensors, each rank its own
  half): nothing is replicated, so the check costs one small collective.
* ``ddp``: plain tensors, identical on both ranks (a DDP model): every byte is
  replicated, so each rank checksums the whole state while it writes half.

For each state, ``shardckpt.save`` with ``check_replicas="error"`` (the default),
``"off"``, and ``"off"`` again as an A/A control (the spread between two
identical variants), interleaved in rotating order, a fresh directory per run, after one
untimed warm-up of each; for ``ddp`` also the ``async_save`` stall (the call's
return; the check runs inside it). Reported: medians and the check's cost as a
fraction of the ``"off"`` time, against the goal (<= 2 % of save time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # benchmark the checkout this file lives in
    sys.path.insert(0, _REPO)

from benchmarks._common import barrier_timed, finish_ranks, rotated, torchrun  # noqa: E402

TENSORS = 16
GOAL = 0.02
CONTROL = "off again"  # a second "off": the spread between two identical variants
LABELS = ["error", "off", CONTROL]


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    import shardckpt

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    numel = int(args.gib * (1 << 30)) // 4 // TENSORS
    gen = torch.Generator().manual_seed(7)
    ddp = {f"layer{i}.weight": torch.randn(numel, generator=gen) for i in range(TENSORS)}
    local = numel // world
    sharded = {
        k: DTensor.from_local(v[rank * local:(rank + 1) * local].clone(), mesh, [Shard(0)], run_check=False)
        for k, v in ddp.items()
    }
    out: dict[str, Any] = {}
    cases = [("sharded", "save", sharded), ("ddp", "save", ddp), ("ddp", "async stall", ddp)]
    for state_name, op, sd in cases:
        times: dict[str, list[float]] = {label: [] for label in LABELS}
        for run in range(args.repeats + 1):
            # rotated each run: no variant always goes first after a deletion
            for label in rotated(LABELS, run):
                mode = "off" if label == CONTROL else label
                path = os.path.join(args.dir, f"{state_name}-{op.split()[0]}-{label}")
                if rank == 0:
                    shutil.rmtree(path, ignore_errors=True)
                    os.sync()
                if op == "save":
                    t = barrier_timed(lambda: shardckpt.save(sd, path, check_replicas=mode))  # noqa: B023
                else:
                    handles: list[Any] = []
                    t = barrier_timed(lambda: handles.append(  # noqa: B023
                        shardckpt.async_save(sd, path, check_replicas=mode)))  # noqa: B023
                    handles[0].result()
                    dist.barrier()
                if run > 0:  # run 0 is the warm-up
                    times[label].append(t)
        out[f"{state_name} {op}"] = times
        if rank == 0:
            print(state_name, op, {m: [round(x, 3) for x in v] for m, v in times.items()}, file=sys.stderr, flush=True)
    shardckpt.close()
    finish_ranks(out, args.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--dir", help="scratch directory (default: a fresh temp dir)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    root = args.dir or tempfile.mkdtemp(prefix="bench_replicas_")
    out = os.path.join(root, "result.json")
    torchrun(__file__, 2, ["--worker", "--gib", str(args.gib), "--repeats", str(args.repeats),
                           "--dir", root, "--out", out], omp_threads=1, stdout=None)  # fmt: skip
    with open(out) as f:
        res = json.load(f)
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\ncheck_replicas cost, 2 ranks, {args.gib:g} GiB fp32, median of {args.repeats} (interleaved)")
    print(f"{'case':18s} {'error (s)':>10s} {'off (s)':>9s} {'off again':>10s} {'cost':>7s} {'A/A':>7s}"
          f"  goal <= {GOAL:.0%}")
    for case, times in res.items():
        on, off, again = (statistics.median(times[k]) for k in LABELS)
        cost, aa = on / off - 1, again / off - 1
        verdict = "met" if cost <= GOAL else ("within A/A spread" if abs(cost) <= abs(aa) else "NOT met")
        print(f"{case:18s} {on:10.3f} {off:9.3f} {again:10.3f} {cost:+7.1%} {aa:+7.1%}  {verdict}")
    print("A/A: the same 'off' save run twice per round; a cost within it is not measurable here.")


if __name__ == "__main__":
    main()
