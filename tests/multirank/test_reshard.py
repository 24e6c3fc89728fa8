"""The resharding matrix: save at world size W in {1, 2, 4}, load at W' in {1, 2, 3, 4}.

One state_dict holds every kind of value (DTensor Shard(0)/Shard(1)/Replicate on a
1-D mesh, (Replicate, Shard(0)) on a 2-D mesh, uneven shards, a dim smaller than
the world size, DDP-style replicated plain tensors, bf16 / int64, non-tensor
values, nesting). Each W is saved once per test session (3 launches) and each W'
loads all three saves in one launch (4 launches, not 12); the launches are
shared by the xdist workers through file locks, and each (W, W') pair is still
its own test, judged from what every rank of its launch reported.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import det_tensor
from tests.manifest_view import entries_view
from tests.multiproc import run_multiprocess

SAVE_WS = (1, 2, 4)
LOAD_WS = (1, 2, 3, 4)
CHUNK_BYTES = 256

#: 2-D mesh shape (replicate dim, shard dim) per world size.
MESH_2D = {1: (1, 1), 2: (2, 1), 3: (1, 3), 4: (2, 2)}

# key -> (shape, dtype, placement kind). Placement kinds: "s0"/"s1"/"r" on the
# 1-D mesh, "2d" = (Replicate(), Shard(0)) on the 2-D mesh, "plain" = the same
# plain tensor on every rank (DDP style).
TENSORS: dict[str, tuple[tuple[int, ...], torch.dtype, str]] = {
    "dt.shard0": ((37, 29), torch.float32, "s0"),  # uneven for 2, 3, 4
    "dt.shard1": ((13, 7), torch.float32, "s1"),  # uneven along dim 1
    "dt.shard1_f64": ((5, 37), torch.float64, "s1"),
    "dt.rows_lt_ws": ((3, 50), torch.float32, "s0"),  # dim 0 smaller than W=4: an empty shard
    "dt.tiny": ((2,), torch.float32, "s0"),  # 1-D, two empty shards at W=4
    "dt.repl": ((19, 11), torch.float32, "r"),
    "dt.bf16": ((41, 6), torch.bfloat16, "s0"),
    "dt.int64": ((17, 5), torch.int64, "s1"),
    "dt.2d": ((23, 9), torch.float32, "2d"),
    "dt.2d_bf16": ((10, 33), torch.bfloat16, "2d"),
    "ddp.scalar": ((), torch.float32, "plain"),
    "ddp.bf16": ((31, 3), torch.bfloat16, "plain"),
    "ddp.int64": ((65,), torch.int64, "plain"),
    "ddp.empty": ((0, 4), torch.float32, "plain"),
}
# DDP-style replicated parameters: enough of them that dedup has to spread them.
for _i in range(10):
    TENSORS[f"ddp.layer{_i}.weight"] = ((7 + 3 * _i, 9), torch.float32, "plain")
    TENSORS[f"ddp.layer{_i}.bias"] = ((7 + 3 * _i,), torch.float32, "plain")

REPLICATED_KINDS = ("r", "plain")
NESTED_PLAIN = ((6, 5), torch.float64)  # state_dict["nested"]["inner"]["t"]

OBJECTS = {
    "step": 1234,
    "meta": {"name": "run-α", "lrs": [0.1, 0.01], "flags": {"a": None, "b": True}},
    "tup": (3, "x", 2.5),
    "raw": b"\x00\xffbytes",
}


def _full(key: str) -> torch.Tensor:
    """The global value of ``key``: the same on every rank, from a fixed seed."""
    shape, dtype, _ = TENSORS[key] if key in TENSORS else (*NESTED_PLAIN, "plain")
    return det_tensor(shape, dtype, sum(key.encode()) * 7919 + len(key))


def _meshes(world_size: int):
    from torch.distributed.device_mesh import init_device_mesh

    mesh1 = init_device_mesh("cpu", (world_size,))
    mesh2 = init_device_mesh("cpu", MESH_2D[world_size], mesh_dim_names=("rep", "shard"))
    return mesh1, mesh2


def _place(full: torch.Tensor, kind: str, mesh1, mesh2):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if kind == "plain":
        return full
    if kind == "2d":
        return distribute_tensor(full, mesh2, [Replicate(), Shard(0)])
    placement = {"s0": Shard(0), "s1": Shard(1), "r": Replicate()}[kind]
    return distribute_tensor(full, mesh1, [placement])


def _state_dict(world_size: int, fill) -> dict:
    """The test state_dict at ``world_size``; ``fill(key)`` gives each full tensor."""
    mesh1, mesh2 = _meshes(world_size)
    sd: dict = {key: _place(fill(key), kind, mesh1, mesh2) for key, (_, _, kind) in TENSORS.items()}
    sd["nested"] = {"inner": {"t": fill("nested.inner.t"), "n": 5}}
    return sd


def _save_worker(rank: int, world_size: int, path: str) -> None:
    import shardckpt

    sd = _state_dict(world_size, _full)
    sd.update(OBJECTS)
    with shardckpt.knobs.override(chunk_bytes=CHUNK_BYTES):
        shardckpt.save(sd, path)


def _zeros(key: str) -> torch.Tensor:
    shape, dtype, _ = TENSORS[key] if key in TENSORS else (*NESTED_PLAIN, "plain")
    return torch.zeros(shape, dtype=dtype)


def _placeholders() -> dict:
    # nested dicts are flattened (as in DCP), so the placeholder keeps the structure
    return {"step": 0, "meta": {"name": "", "lrs": None, "flags": {"a": 0, "b": None}}, "tup": None, "raw": None}


def _problems(sd: dict) -> list[str]:
    """Differences from the saved values. Runs every collective (``full_tensor``) in
    the same order on every rank before judging, so a mismatch never desyncs ranks."""
    from torch.distributed.tensor import DTensor

    fulls = {k: sd[k].full_tensor() if isinstance(sd[k], DTensor) else sd[k] for k in TENSORS}
    fulls["nested.inner.t"] = sd["nested"]["inner"]["t"]
    out = []
    for key, got in fulls.items():
        want = _full(key)
        if got.dtype != want.dtype or got.shape != want.shape:
            out.append(f"{key}: {got.dtype} {list(got.shape)}, saved {want.dtype} {list(want.shape)}")
        elif not torch.equal(got, want):
            bad = (got != want).nonzero()
            out.append(f"{key}: {len(bad)} element(s) differ, first at {bad[0].tolist()}")
    if sd["nested"]["inner"]["n"] != 5:
        out.append(f"nested.inner.n: {sd['nested']['inner']['n']!r}")
    for key, value in OBJECTS.items():
        if type(sd[key]) is not type(value) or sd[key] != value:
            out.append(f"{key}: {sd[key]!r}, saved {value!r}")
    return out


def _load_worker(rank: int, world_size: int, paths: dict[int, str], out_dir: str) -> None:
    """Load every saved checkpoint at this world size; each rank reports its problems
    per save world size to ``out_dir`` (a failure in one pair must not hide others)."""
    import shardckpt

    report: dict[int, list[str]] = {}
    # small read pieces too, so resharded reads are split across chunk boundaries
    with shardckpt.knobs.override(max_read_bytes=512):
        for save_ws, path in sorted(paths.items()):
            problems = report[save_ws] = []
            sd = _state_dict(world_size, _zeros)
            sd["nested"]["inner"]["n"] = 0
            sd.update(_placeholders())
            try:
                shardckpt.load(sd, path)  # raises on every rank alike, or on none
            except shardckpt.ShardckptError as e:
                problems.append(f"sharded load raised {type(e).__name__}: {e}")
                continue
            problems += [f"(into DTensors) {p}" for p in _problems(sd)]

            # the same checkpoint into plain full tensors on every rank
            plain = {key: _zeros(key) for key in TENSORS}
            plain["nested"] = {"inner": {"t": _zeros("nested.inner.t"), "n": 0}}
            plain.update(_placeholders())
            try:
                shardckpt.load(plain, path)
            except shardckpt.ShardckptError as e:
                problems.append(f"plain load raised {type(e).__name__}: {e}")
                continue
            problems += [f"(into plain tensors) {p}" for p in _problems(plain)]
    with open(os.path.join(out_dir, f"load{world_size}-r{rank}.json"), "w") as f:
        json.dump(report, f)


class _SessionJobs:
    """Launches shared by every xdist worker of the session: each job runs once, in
    whichever worker takes it first (an flock per job); the other worker picks
    another pending job meanwhile, or waits. A job's outcome is a marker file:
    empty on success, else the traceback."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.save_ws: list[int] = list(SAVE_WS)
        self.load_ws: list[int] = list(LOAD_WS)

    def _marker(self, name: str) -> Path:
        return self.root / f"{name}.done"

    def ensure(self, jobs: dict[str, Callable[[], None]]) -> None:
        pending = dict(jobs)
        while pending:
            progressed = False
            for name, job in list(pending.items()):
                if not self._marker(name).exists():
                    with open(self.root / f"{name}.lock", "w") as lock:
                        try:
                            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        except BlockingIOError:
                            continue  # the other worker runs it
                        try:
                            if not self._marker(name).exists():
                                try:
                                    job()
                                    outcome = ""
                                except Exception:  # noqa: BLE001 - reported by every test needing it
                                    outcome = traceback.format_exc()
                                self._marker(name).write_text(outcome)
                        finally:
                            fcntl.flock(lock, fcntl.LOCK_UN)
                del pending[name]
                progressed = True
            if pending and not progressed:
                time.sleep(0.1)

    def error(self, name: str) -> str:
        return self._marker(name).read_text()


@pytest.fixture(scope="module")
def matrix(request, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    # under xdist each worker's basetemp is inside the session's own directory
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "reshard_matrix"
    root.mkdir(exist_ok=True)
    jobs = _SessionJobs(root)
    # Only the launches the selected tests need (every xdist worker sees the same
    # selection, so they agree on the jobs and their arguments).
    params = [getattr(item, "callspec", None) for item in request.session.items if item.module is request.module]
    params = [p.params for p in params if p is not None]
    jobs.save_ws = sorted({p["save_ws"] for p in params if "save_ws" in p})
    jobs.load_ws = sorted({p["load_ws"] for p in params if "load_ws" in p})
    return jobs


def _ensure_saved(matrix: _SessionJobs) -> None:
    matrix.ensure({
        f"save{w}": functools.partial(run_multiprocess, _save_worker, w, str(matrix.root / f"w{w}"), timeout=120)
        for w in matrix.save_ws
    })


def _ensure_loaded(matrix: _SessionJobs) -> None:
    """Every load launch the session needs: both xdist workers take them as they come."""
    _ensure_saved(matrix)
    paths = {w: str(matrix.root / f"w{w}") for w in matrix.save_ws if not matrix.error(f"save{w}")}
    matrix.ensure({
        f"load{w}": functools.partial(run_multiprocess, _load_worker, w, paths, str(matrix.root), timeout=120)
        for w in matrix.load_ws
    })


@pytest.mark.parametrize("save_ws", SAVE_WS, ids=lambda w: f"save{w}")
@pytest.mark.parametrize("load_ws", LOAD_WS, ids=lambda w: f"load{w}")
def test_reshard_matrix(matrix, load_ws, save_ws):
    """Bit-identical values after saving at ``save_ws`` ranks and loading at ``load_ws``."""
    _ensure_loaded(matrix)
    if matrix.error(f"save{save_ws}"):
        pytest.fail(f"save at {save_ws} rank(s) failed:\n{matrix.error(f'save{save_ws}')}")
    if matrix.error(f"load{load_ws}"):
        pytest.fail(f"the load launch at {load_ws} rank(s) failed:\n{matrix.error(f'load{load_ws}')}")
    problems = []
    for rank in range(load_ws):
        report = json.loads((matrix.root / f"load{load_ws}-r{rank}.json").read_text())
        problems += [f"rank {rank}: {p}" for p in report[str(save_ws)]]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("save_ws", SAVE_WS, ids=lambda w: f"save{w}")
def test_replicated_tensors_are_written_once(matrix, save_ws):
    import shardckpt

    _ensure_saved(matrix)
    if matrix.error(f"save{save_ws}"):
        pytest.fail(f"save at {save_ws} rank(s) failed:\n{matrix.error(f'save{save_ws}')}")
    path = matrix.root / f"w{save_ws}"
    shardckpt.verify(path)
    doc = json.loads((path / "manifest.json").read_text())
    entries = entries_view(path)
    assert doc["body"]["world_size"] == save_ws

    # every stored element exactly once: stored slices tile the tensor with no overlap
    for key, (shape, _, kind) in TENSORS.items():
        shards = entries[key]["shards"]
        stored = sum(math.prod(s["sizes"]) for s in shards)
        assert stored == math.prod(shape), (key, [(s["offsets"], s["sizes"]) for s in shards])
        if kind in REPLICATED_KINDS:
            assert len(shards) == 1, (key, shards)
    assert len(entries["nested.inner.t"]["shards"]) == 1

    replicated_files = {
        s["file"]
        for key, (_, _, kind) in TENSORS.items()
        if kind in REPLICATED_KINDS
        for s in entries[key]["shards"]
    }
    assert all(f.startswith("data/") and f.endswith(".bin") for f in replicated_files)
    if save_ws == 4:
        # dedup spreads the replicated writes over ranks instead of piling them on rank 0
        assert len(replicated_files) > 1, replicated_files
