"""One rank of a multi-tier test job, started by torchrun (see ``tests/multinode/test_tiers_multinode.py``).

    python -m tests.multinode._tiers_worker MODE LOCAL REMOTE [options]

Node-local storage that outlives a job: the agent runs in its own mount
namespace (``run_multinode(private_tmpfs=LOCAL)``) and local rank 0 bind-mounts
``$NODE_DISKS/node<GROUP_RANK>`` over LOCAL before the process group exists,
so each node sees only its own "disk" at the same path, the files survive the
job (the test inspects them, and deleting one is losing that node), and a
SIGKILL leaves them exactly as they were at that instant.

MODE ``train``: steps 1..``--until``, saving through a ``CheckpointManager``
with ``local_root=LOCAL`` and durable ``REMOTE``; ``--kill-at-exchange N``
SIGKILLs every rank once its own shard of step N is written, as the replica
exchange begins (a power cut mid-save). MODE ``restore``: restores into a
zeroed state and compares every local shard bitwise with the state of the
step it got. Each rank writes ``$RESULT_DIR/rank<R>.json`` (step, what rank 0
logged about the choice, problems).

The state depends only on (seed, key, step), never on the world size.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tests.helpers import det_tensor

SEED = 1234
TENSORS: dict[str, tuple[tuple[int, ...], torch.dtype, str]] = {
    "w": ((37, 5), torch.float32, "s0"),  # uneven at 2, 3 and 4 ranks
    "few": ((7, 4), torch.float64, "s0"),  # uneven: 2,2,2,1 at 4 ranks
    "repl": ((11, 6), torch.float32, "r"),
    "plain": ((17,), torch.float32, "plain"),
    "ids": ((23,), torch.int64, "plain"),
}


def _full(key: str, step: int) -> torch.Tensor:
    shape, dtype, _ = TENSORS[key]
    return det_tensor(shape, dtype, SEED + sum(key.encode()) * 7919 + step * 104729)


def state(step: int, zeros: bool = False) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    sd: dict[str, Any] = {}
    for key, (_, _, kind) in TENSORS.items():
        full = torch.zeros_like(_full(key, step)) if zeros else _full(key, step)
        if kind == "plain":
            sd[key] = full
        else:
            sd[key] = distribute_tensor(full, mesh, [Shard(0) if kind == "s0" else Replicate()], src_data_rank=None)
    sd["meta"] = {"step": -1 if zeros else step, "name": "" if zeros else f"tiers-{step}"}
    return sd


def problems(got: dict[str, Any], step: int) -> list[str]:
    from torch.distributed.tensor import DTensor

    want, out = state(step), []
    for key in TENSORS:
        g, w = got[key], want[key]
        g, w = (g.to_local() if isinstance(g, DTensor) else g), (w.to_local() if isinstance(w, DTensor) else w)
        if g.shape != w.shape or not torch.equal(g.contiguous().view(-1).view(torch.uint8),
                                                 w.contiguous().view(-1).view(torch.uint8)):
            out.append(f"{key}: local shard differs from step {step}'s")
    if got["meta"] != want["meta"]:
        out.append(f"meta: {got['meta']!r}, expected {want['meta']!r}")
    return out


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _mount_node_disk(local: str) -> None:
    """Local rank 0: this node's persistent disk over LOCAL (see the module docstring)."""
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    disk = os.path.join(os.environ["NODE_DISKS"], f"node{os.environ['GROUP_RANK']}")
    os.makedirs(disk, exist_ok=True)
    subprocess.run(["mount", "--bind", disk, local], check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "restore"])
    p.add_argument("local")
    p.add_argument("remote")
    p.add_argument("--until", type=int, default=30)
    p.add_argument("--persist", type=int, default=20)
    p.add_argument("--kill-at-exchange", type=int, default=None)
    p.add_argument("--storage-options", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    _mount_node_disk(a.local)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    dist.barrier()  # every local rank sees the node's disk only after local rank 0 mounted it
    import shardckpt
    from shardckpt.manager.tiers import exchange

    capture = _Capture()
    logging.getLogger("shardckpt").addHandler(capture)
    logging.getLogger("shardckpt").setLevel(logging.INFO)
    opts = json.loads(a.storage_options) if a.storage_options else None
    rank = dist.get_rank()
    report: dict[str, Any] = {"rank": rank, "node": os.environ.get("GROUP_RANK")}
    mgr = shardckpt.CheckpointManager(a.remote, local_root=a.local, local_keep_last=2, local_replicas=1,
                                      persist_interval_steps=a.persist, save_interval_steps=10, keep_last=3,
                                      async_save=True, storage_options=opts)
    if a.mode == "train":
        if a.kill_at_exchange is not None:
            real = exchange.transfer
            doomed = a.kill_at_exchange

            def transfer(group: Any, sends: Any, receives: Any) -> Any:
                if any(f"step_{doomed:010d}" in s.source.url for s in sends):
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(group, sends, receives)

            exchange.transfer = transfer  # type: ignore[assignment]
            sys.modules["shardckpt.manager.tiers.local_tier"].transfer = transfer  # type: ignore[attr-defined]
        for step in range(1, a.until + 1):
            sd = state(step)
            if mgr.should_save(step):
                mgr.save(step, sd, metrics={"loss": 1.0 / step})
        mgr.close()
        report["list"] = [[c.step, c.status, list(c.tiers)] for c in mgr.list()]
    else:
        sd = state(0, zeros=True)
        got = mgr.restore(sd)
        report.update(step=got, problems=problems(sd, got) if got is not None else ["nothing restored"])
        mgr.close()
    report["log"] = capture.messages
    with open(os.path.join(os.environ["RESULT_DIR"], f"rank{rank}.json"), "w") as f:
        json.dump(report, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from shardckpt import run_and_exit

    run_and_exit(main)
