"""One rank of a multi-node test job, started by torchrun (see ``tests/multinode/harness.py``).

    python -m tests.multinode.multinode_worker MODE PATH [--storage-options JSON]

MODE is ``save``, ``load`` or ``save-expect-error``. The state dict depends only on
``SEED``, never on the world size, so a checkpoint saved at one layout (nodes x
processes) must load bit for bit at any other: ``load`` rebuilds every expected
local shard from the seed and compares bytes, not values within a tolerance.

``save-expect-error`` is for saves that must fail (e.g. a path that is not on
shared storage): each rank writes what happened to ``$RESULT_DIR/rank<R>.txt``
(JSON: outcome, exception type and message, elapsed seconds), because a rank's
stderr alone does not tell "raised the right error" from "hung, then was killed".
It exits 0 only if ``shardckpt.CheckpointWriteError`` was raised.

Ends with ``os._exit`` after flushing: gloo's teardown can abort the interpreter
after a successful run (see ``shardckpt.run_and_exit``), which torchrun would
report as a failed worker.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tests.helpers import det_tensor

#: Overridable so a test (or a person) can check that a wrong state is caught.
SEED = int(os.environ.get("MULTINODE_SEED", "20240611"))
#: How long a collective may wait for a peer before failing: a desync fails the
#: worker well within the harness's per-call timeout instead of hanging on.
PG_TIMEOUT_S = float(os.environ.get("MULTINODE_PG_TIMEOUT_S", "45"))

# key -> (global shape, dtype, placement kind): "s0" Shard(0) / "r" Replicate() on a
# 1-D mesh of all ranks, "plain" the same ordinary tensor on every rank (DDP style).
TENSORS: dict[str, tuple[tuple[int, ...], torch.dtype, str]] = {
    "dt.w": ((37, 5), torch.float32, "s0"),  # uneven at 2, 3 and 4 ranks
    "dt.b": ((129,), torch.float32, "s0"),
    "dt.few_rows": ((3, 4), torch.float64, "s0"),  # fewer rows than ranks at 4: an empty shard
    "dt.repl": ((11, 6), torch.float32, "r"),
    "plain.bias": ((17,), torch.float32, "plain"),
    "plain.ids": ((23,), torch.int64, "plain"),
}
OBJECTS: dict[str, Any] = {
    "step": 1234,
    "meta": {"name": "multinode-α", "lrs": [0.1, 0.01], "done": False},
}


def _full(key: str) -> torch.Tensor:
    """The global value of ``key``, from ``SEED`` and the key alone."""
    shape, dtype, _ = TENSORS[key]
    return det_tensor(shape, dtype, SEED + sum(key.encode()) * 7919)


def _state_dict(zeros: bool = False) -> dict[str, Any]:
    """The state at the current world size; ``zeros``: same layout, zero values and
    placeholder objects (nested dicts are flattened, so placeholders keep the keys)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    sd: dict[str, Any] = {}
    for key, (_, _, kind) in TENSORS.items():
        full = torch.zeros_like(_full(key)) if zeros else _full(key)
        if kind == "plain":
            sd[key] = full
        else:
            # src_data_rank=None: every rank splits its own copy, no scatter, so
            # building the expected shards needs no communication
            placement = Shard(0) if kind == "s0" else Replicate()
            sd[key] = distribute_tensor(full, mesh, [placement], src_data_rank=None)
    if zeros:
        sd.update({"step": 0, "meta": {"name": "", "lrs": None, "done": None}})
    else:
        sd.update(json.loads(json.dumps(OBJECTS)))  # a copy
    return sd


def _local(value: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return value.to_local() if isinstance(value, DTensor) else value


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _problems(got: dict[str, Any]) -> list[str]:
    """Every difference between a loaded state and this rank's expected shards."""
    want = _state_dict()
    out = []
    for key in TENSORS:
        g, w = _local(got[key]), _local(want[key])
        if g.dtype != w.dtype or g.shape != w.shape:
            out.append(f"{key}: local shard {g.dtype} {list(g.shape)}, expected {w.dtype} {list(w.shape)}")
        elif not torch.equal(_bytes(g), _bytes(w)):
            bad = (g.reshape(-1) != w.reshape(-1)).nonzero().flatten().tolist()
            out.append(f"{key}: {len(bad)} element(s) of the local shard differ, first at flat index {bad[:1]}")
    for key, value in OBJECTS.items():
        if got[key] != value or type(got[key]) is not type(value):
            out.append(f"{key}: {got[key]!r}, expected {value!r}")
    return out


def _kwargs(storage_options: str | None) -> dict[str, Any]:
    # shardckpt.save/load are gaining storage_options=; pass it only when asked for
    return {} if storage_options is None else {"storage_options": json.loads(storage_options)}


def _save_expect_error(path: str, kwargs: dict[str, Any]) -> int:
    import shardckpt

    rank = dist.get_rank()
    report: dict[str, Any] = {"rank": rank, "node": int(os.environ.get("GROUP_RANK", -1))}
    t0 = time.monotonic()
    ok = False
    try:
        shardckpt.save(_state_dict(), path, **kwargs)
        report.update(outcome="committed", type=None, message="")
    except Exception as e:  # noqa: BLE001 - any type is reported; only one is success
        ok = isinstance(e, shardckpt.CheckpointWriteError)
        report.update(outcome="raised", type=type(e).__name__, message=str(e),
                      traceback=traceback.format_exc())
    report["elapsed_s"] = time.monotonic() - t0
    with open(os.path.join(os.environ["RESULT_DIR"], f"rank{rank}.txt"), "w") as f:
        json.dump(report, f, ensure_ascii=False, indent=1)
    print(f"rank {rank}: {report['outcome']} {report['type']} after {report['elapsed_s']:.2f}s: "
          f"{report['message']}", file=sys.stderr, flush=True)
    return 0 if ok else 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["save", "load", "save-expect-error"])
    p.add_argument("path")
    p.add_argument("--storage-options", default=None, help="JSON dict for shardckpt's storage_options=")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=PG_TIMEOUT_S))  # torchrun's env://
    kwargs = _kwargs(args.storage_options)
    import shardckpt

    rank, world = dist.get_rank(), dist.get_world_size()
    if args.mode == "save-expect-error":
        code = _save_expect_error(args.path, kwargs)
        dist.destroy_process_group()  # no barrier: ranks may have left the save at different points
        return code
    t0 = time.monotonic()
    if args.mode == "save":
        shardckpt.save(_state_dict(), args.path, **kwargs)
        problems: list[str] = []
    else:
        sd = _state_dict(zeros=True)
        shardckpt.load(sd, args.path, **kwargs)
        problems = _problems(sd)
    elapsed = time.monotonic() - t0
    dist.barrier()
    dist.destroy_process_group()
    if problems:
        print(f"rank {rank}/{world}: loaded state differs from the saved one:\n  "
              + "\n  ".join(problems), file=sys.stderr, flush=True)
        return 4
    print(f"rank {rank}: {args.mode} ok in {elapsed:.2f}s", flush=True)
    return 0


if __name__ == "__main__":
    from shardckpt import run_and_exit

    run_and_exit(main)
