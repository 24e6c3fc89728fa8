"""One rank of a dying-rank scenario (``tests/faults/test_dying_rank.py`` spawns them).

Usage: ``python tests/faults/_dying_rank_worker.py RANK WORLD PORT PHASE HOW VICTIM ROOT OUT``

Every rank saves step 1 (and, for the load phases, step 2) under ``ROOT`` with a
``CheckpointManager``. Then the faulty step runs: the victim rank signals itself
(``HOW``: SIGKILL or SIGSTOP) at a fixed point in the middle of it, after writing
``OUT/fired``: while writing its first item (``save``, ``async_save``) or while
reading (``load`` through ``CheckpointManager.restore``, ``bare_load`` through
``shardckpt.load``), or (``control``) just before ``restore``, whose first step
is a decision on the manager's control group. Each surviving rank writes ``OUT/rank<R>.json`` with the
type of what it raised, whether that is a ``ShardckptError``, the message and
the seconds from the start of the faulty step, then exits at once (a survivor
must not linger in a collective with a peer that is gone).

The process group is created like a user would (torch's default timeout of 30
minutes): bounding the wait is shardckpt's job (``SHARDCKPT_COLLECTIVE_TIMEOUT_S``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import shardckpt
from shardckpt.dcp.reader import ShardckptReader
from shardckpt.io.save_target import SaveTarget
from shardckpt.manager import step_dirname


def state_for(step: int, world: int) -> dict[str, torch.Tensor]:
    """The state every scenario saves at ``step``: one tensor per rank (each rank writes its own)."""
    return {f"r{r}": torch.arange(4096, dtype=torch.float32) * (step + 1) + r for r in range(world)}


def local_state(step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    return {f"r{rank}": state_for(step, world)[f"r{rank}"].clone()}


def _fire(out: str, how: str) -> None:
    with open(os.path.join(out, "fired"), "w") as f:
        f.write(str(os.getpid()))
    os.kill(os.getpid(), getattr(signal, how))


def _arm(phase: str, out: str, how: str) -> None:
    """Make this (victim) process signal itself in the middle of the faulty step."""
    if phase in ("save", "async_save"):
        original_write = SaveTarget.write_items

        def write_items(self, target, items, resolve):  # type: ignore[no-untyped-def]
            def resolve_then_die(item):  # type: ignore[no-untyped-def]
                _fire(out, how)
                return resolve(item)

            return original_write(self, target, items, resolve_then_die)

        SaveTarget.write_items = write_items  # type: ignore[method-assign]
    else:
        original_read = ShardckptReader.read_data

        def read_data(self, plan, planner):  # type: ignore[no-untyped-def]
            _fire(out, how)
            return original_read(self, plan, planner)

        ShardckptReader.read_data = read_data  # type: ignore[method-assign]


def main() -> None:
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    phase, how, victim, root, out = sys.argv[4], sys.argv[5], int(sys.argv[6]), sys.argv[7], sys.argv[8]
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    mgr = shardckpt.CheckpointManager(root, async_save=(phase == "async_save"))
    mgr.save(1, local_state(1, rank, world))
    if phase in ("load", "bare_load", "control"):
        mgr.save(2, local_state(2, rank, world))
    mgr.wait()
    dist.barrier()
    if rank == victim and phase == "control":
        _fire(out, how)  # gone before the manager's first decision (rank 0 lists the root)
    if rank == victim:
        _arm(phase, out, how)
    t0 = time.monotonic()
    outcome: dict[str, object]
    try:
        if phase in ("save", "async_save"):
            mgr.save(2, local_state(2, rank, world))
            mgr.wait()
        elif phase in ("load", "control"):
            mgr.restore(state_for(0, world))  # a strict load: every rank asks for every key
        else:
            shardckpt.load({"state": state_for(0, world)}, os.path.join(root, step_dirname(2)))
        outcome = {"raised": None}
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which judges it
        outcome = {"raised": type(e).__name__, "typed": isinstance(e, shardckpt.ShardckptError), "message": str(e)}
    outcome["seconds"] = time.monotonic() - t0
    with open(os.path.join(out, f"rank{rank}.json.tmp"), "w") as f:
        json.dump(outcome, f)
    os.replace(os.path.join(out, f"rank{rank}.json.tmp"), os.path.join(out, f"rank{rank}.json"))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
