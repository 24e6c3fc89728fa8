#!/usr/bin/env python
"""Many small tensors on many ranks: the per-rank x per-tensor overhead, vs DCP, same run.

    python benchmarks/bench_many.py [--ranks 8] [--params 300] [--repeats 5] [--json out.json]

State: shaped like a sharded model with Adam: ``--params`` parameters, each with
two moments (3 tensors per parameter), every one a DTensor ``Shard(0)`` over all
ranks with a tiny payload (64 x 16 fp32), so metadata, planning and collectives
dominate, not bytes. Launched as one ``torchrun --standalone`` job of this file
(``--phase``); rank 0 writes the results.

Timed per library, interleaved A B A B ... (medians; rank 0: barrier, clock,
call, barrier, clock):
  save         shardckpt.save vs dcp.save(FileSystemWriter)
  load         shardckpt.load vs dcp.load(FileSystemReader), same world size
  async stall  the 2nd+ blocking part of shardckpt.async_save vs dcp.async_save
               (each handle's result() is awaited outside the timed region)
  restore      CheckpointManager.restore (default verify_on_restore=True) vs a plain
               shardckpt.load of the same checkpoint (target <= 1.1x)
Targets (printed, never asserted): save, load and async stall <= 0.5x DCP's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from benchmarks._common import barrier_timed, finish_ranks, torchrun, write_json  # noqa: E402

ROWS, COLS = 64, 16


def _state(params: int, mesh: Any, fill: float | None = None) -> dict[str, Any]:
    import torch
    from torch.distributed.tensor import Shard, distribute_tensor

    sd: dict[str, Any] = {}
    g = torch.Generator().manual_seed(0)
    for i in range(params):
        for kind in ("param", "exp_avg", "exp_avg_sq"):
            full = torch.randn(ROWS, COLS, generator=g) if fill is None else torch.full((ROWS, COLS), fill)
            sd[f"layers.{i}.{kind}"] = distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None)
    return sd


def phase(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    import shardckpt

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    sd = _state(args.params, mesh)
    base = args.dir
    times: dict[str, dict[str, list[float]]] = {}

    def record(op: str, lib: str, t: float) -> None:
        times.setdefault(op, {}).setdefault(lib, []).append(t)

    def fresh(name: str) -> str:
        path = os.path.join(base, name)
        if rank == 0 and os.path.exists(path):
            shutil.rmtree(path)
        dist.barrier()
        return path

    ours = shardckpt.AsyncCheckpointer()
    for rep in range(args.repeats + 1):  # rep 0 warms both up
        p_ours, p_dcp = fresh("ours"), fresh("dcp")
        t_ours = barrier_timed(lambda p=p_ours: shardckpt.save(sd, p))
        t_dcp = barrier_timed(lambda p=p_dcp: dcp.save(sd, storage_writer=dcp.FileSystemWriter(p)))
        out = _state(args.params, mesh, fill=0.0)
        l_ours = barrier_timed(lambda p=p_ours, o=out: shardckpt.load(o, p))
        l_dcp = barrier_timed(lambda p=p_dcp, o=out: dcp.load(o, storage_reader=dcp.FileSystemReader(p)))
        a_ours, a_dcp = fresh("a_ours"), fresh("a_dcp")
        h: list[Any] = []
        s_ours = barrier_timed(lambda p=a_ours, h=h: h.append(ours.async_save(sd, p)))
        h.pop().result()
        s_dcp = barrier_timed(lambda p=a_dcp, h=h: h.append(dcp.async_save(sd, storage_writer=dcp.FileSystemWriter(p))))
        h.pop().result()
        dist.barrier()
        mgr_root = os.path.join(base, "mgr")
        if rep == 0:
            if rank == 0 and os.path.exists(mgr_root):
                shutil.rmtree(mgr_root)
            dist.barrier()
            with shardckpt.CheckpointManager(mgr_root) as mgr:
                mgr.save(1, sd, force=True)
        step_path = os.path.join(mgr_root, "step_0000000001")
        with shardckpt.CheckpointManager(mgr_root) as mgr:
            r_mgr = barrier_timed(lambda m=mgr, o=out: m.restore(_Holder(o)))
        r_plain = barrier_timed(lambda o=out, p=step_path: shardckpt.load({"state": o}, p))
        if rep == 0:
            continue
        for op, a, b in (("save", t_ours, t_dcp), ("load", l_ours, l_dcp), ("async stall", s_ours, s_dcp),
                         ("restore vs load", r_mgr, r_plain)):
            record(op, "shardckpt" if op != "restore vs load" else "restore", a)
            record(op, "dcp" if op != "restore vs load" else "plain load", b)
    ours.close()
    finish_ranks({"ranks": world, "params": args.params, "tensors": 3 * args.params, "times": times}, args.out)


class _Holder:
    """A Stateful over a state_dict, as CheckpointManager.restore expects."""

    def __init__(self, sd: dict[str, Any]) -> None:
        self.sd = sd

    def state_dict(self) -> dict[str, Any]:
        return self.sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass  # tensors were filled in place


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--params", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--phase", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        phase(args)
        return
    work = tempfile.mkdtemp(prefix="bench_many-")
    out = os.path.join(work, "result.json")
    try:
        torchrun(__file__, args.ranks, ["--phase", "--dir", work, "--out", out, "--params", str(args.params),
                                        "--repeats", str(args.repeats)], omp_threads=1, stdout=None)  # fmt: skip
        with open(out) as f:
            res = json.load(f)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{res['ranks']} gloo ranks, {res['tensors']} DTensors Shard(0) of {ROWS}x{COLS} fp32, "
          f"{args.repeats} interleaved repeats, medians; {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores")
    print(f"{'operation':<18}{'ours (s)':>10}{'peer (s)':>10}{'ours/peer':>11}  target")
    summary = {}
    for op, libs in res["times"].items():
        (a_name, a), (b_name, b) = list(libs.items())
        ma, mb = statistics.median(a), statistics.median(b)
        target = 1.1 if op == "restore vs load" else 0.5
        summary[op] = {a_name: ma, b_name: mb, "ratio": ma / mb, "target": target}
        print(f"{op:<18}{ma:>10.3f}{mb:>10.3f}{ma / mb:>10.2f}x  <= {target}x "
              f"({'met' if ma / mb <= target else 'not met'})")
    write_json({"result": res, "summary": summary}, args.json)


if __name__ == "__main__":
    main()
