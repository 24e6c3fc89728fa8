"""Kill points: SIGKILL a save at numbered I/O calls and at random instants.

Each scenario is (backend, ranks, mode, kind): local or S3 (moto), 1 or 2 gloo
ranks, ``save`` or ``async_save``, and one of

- ``fresh``: a new step next to two committed ones;
- ``overwrite``: ``save(overwrite=True)`` over a committed step (the swap);
- ``retention``: ``CheckpointManager(keep_last=2).save`` that prunes a step.

A dry run (nothing armed) traces every I/O call of the save through the
``fault://`` backend (``tests/faultstore.py``) and labels each with its phase
(planning, writing, writeback, manifest, swap/cleanup, retention, owner). Then,
per chosen call index, rank processes are forked from this process (torch
already imported: no interpreter start per point) with the kill armed at that
call of one rank; when a rank dies the others are killed too, as a launcher
would. Random wall-clock kills (fixed seed) cut in at instants between calls.

After each kill, here: the target loads bitwise as the new state (or, for an
overwrite, the old one), or raises a typed ``ShardckptError``; every earlier
committed step loads bitwise; a manager over the root restores the newest valid
step; a new save to the target succeeds. A failure names its replay parameters.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist

import shardckpt
from shardckpt import knobs
from shardckpt.errors import ShardckptError
from shardckpt.store import step_dirname
from tests import faultstore
from tests.figures import record
from tests.helpers import blank_like, states_equal

CHUNK_BYTES = 512
SEED = 20261201
KINDS = ("fresh", "overwrite", "retention")


# ----------------------------------------------------------------------------- states


def make_state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    # four tensors of similar size: two ranks each get some to write (replicas are balanced)
    return {"w0": torch.randn(40, 8, generator=g), "w1": torch.randn(300, generator=g),
            "w2": torch.randint(0, 1 << 30, (64, 5), generator=g), "w3": torch.randn(310, generator=g),
            "n": seed, "tag": f"state-{seed}"}


def blank_state() -> dict[str, Any]:
    return blank_like(make_state(0), {"n": -1, "tag": ""})


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Bitwise equality of two states."""
    return states_equal(a, b, bitwise=True)


A, B, C, D = (make_state(s) for s in (1, 2, 3, 4))


# ----------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    backend: str  # local | s3
    ranks: int
    mode: str  # sync | async
    kind: str  # fresh | overwrite | retention

    def __str__(self) -> str:
        return f"{self.backend}-{self.ranks}r-{self.mode}-{self.kind}"

    @property
    def target(self) -> int:
        return 2 if self.kind == "overwrite" else 3


@dataclass
class Place:
    """Where a scenario runs: a root URL (inner, un-faulted) and its options."""

    root: str
    options: dict[str, Any] | None

    def step(self, step: int) -> str:
        return f"{self.root}/{step_dirname(step)}"


def child_save(sc: Scenario, place: Place) -> None:
    """The save under test, run in a forked rank process, through ``fault://``."""
    root, opts = faultstore.url(place.root), place.options
    target = f"{root}/{step_dirname(sc.target)}"
    meta = {"step": sc.target}
    if sc.kind == "retention":
        mgr = shardckpt.CheckpointManager(root, keep_last=2, async_save=sc.mode == "async",
                                          storage_options=opts)
        try:
            mgr.save(sc.target, C)
        finally:
            mgr.close()
    elif sc.mode == "sync":
        shardckpt.save({"state": C}, target, overwrite=sc.kind == "overwrite", metadata=meta, storage_options=opts)
    else:
        # a checkpointer of this process: the default one may be the parent's, its thread gone
        with shardckpt.AsyncCheckpointer() as ckpt:
            handle = ckpt.async_save({"state": C}, target, overwrite=sc.kind == "overwrite", metadata=meta,
                                     storage_options=opts)
            assert handle is not None
            handle.result()


# ----------------------------------------------------------------------------- forking ranks


def fork_ranks(world: int, body: Callable[[int, Any], None], kill_after: float | None = None,
               timeout: float = 60.0) -> list[int]:
    """Run ``body(rank, store)`` in ``world`` forked processes; return each one's wait
    status as a code (``-signum`` if killed). A rank killed by a signal takes the
    others down with it. ``kill_after``: SIGKILL all ranks that long after all are
    ready (they write one byte to the pipe just before the save)."""
    fd, store_file = tempfile.mkstemp(prefix="kp-store-")
    os.close(fd)
    os.unlink(store_file)
    ready_r, ready_w = os.pipe()
    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                os.close(ready_r)
                store = dist.FileStore(store_file, world) if world > 1 else None
                body(rank, (store, ready_w))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(ready_w)
    deadline = time.monotonic() + timeout
    status: dict[int, int] = {}
    try:
        if kill_after is not None:
            got = 0
            while got < world and time.monotonic() < deadline:
                if select.select([ready_r], [], [], 0.5)[0]:
                    chunk = os.read(ready_r, 16)
                    if not chunk:
                        break
                    got += len(chunk)
            time.sleep(kill_after)
            for pid in pids:
                _kill(pid)
        while len(status) < world:
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks still running after {timeout}s")
            for pid in pids:
                if pid in status:
                    continue
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:
                    status[pid] = -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
                    if status[pid] == -signal.SIGKILL:
                        for other in pids:
                            if other not in status:
                                _kill(other)
            time.sleep(0.002)
    finally:
        os.close(ready_r)
        for pid in pids:
            if pid not in status:
                _kill(pid)
                os.waitpid(pid, 0)
        if os.path.exists(store_file):
            os.unlink(store_file)
    return [status.get(p, -signal.SIGKILL) for p in pids]


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_scenario(sc: Scenario, place: Place, victim: int = 0, at: int | None = None,
                 kill_after: float | None = None, trace_dir: str | None = None) -> list[int]:
    """Fork the ranks of ``sc`` and run its save; ``at``: kill rank ``victim`` at that call."""

    def body(rank: int, ctx: Any) -> None:  # pragma: no cover - child
        store, ready = ctx
        torch.set_num_threads(1)
        if store is not None:
            dist.init_process_group("gloo", store=store, rank=rank, world_size=sc.ranks,
                                    timeout=timedelta(seconds=30))
        with knobs.override(chunk_bytes=CHUNK_BYTES):
            faultstore.arm("kill" if at is not None and rank == victim else None, at or 0)
            os.write(ready, b"r")
            t0 = time.monotonic()
            child_save(sc, place)
            took = time.monotonic() - t0
        if trace_dir is not None:
            calls = [c.__dict__ for c in faultstore.trace()]
            with open(os.path.join(trace_dir, f"r{rank}.json"), "w") as f:
                json.dump({"calls": calls, "seconds": took}, f)
        if store is not None:
            dist.barrier()
            dist.destroy_process_group()

    return fork_ranks(sc.ranks, body, kill_after=kill_after)


# ----------------------------------------------------------------------------- phases


def label_phases(calls: list[dict[str, Any]], kind: str) -> list[str]:
    """The save phase of each traced call, in order."""
    out, state = [], "planning"
    for c in calls:
        site, path = c["site"], c["path"]
        name = path.rsplit("/", 1)[-1]
        if name == ".shardckpt-owner":
            out.append("owner")
            continue
        if state == "planning" and site in ("open_writer", "writer.write"):
            state = "writing"
        elif state in ("planning", "writing") and site == "writer.close":
            state = "writeback"
        elif state in ("planning", "writing", "writeback") and name.startswith("manifest.json") \
                and site in ("put", "rename"):
            state = "manifest"
        elif state == "manifest" and site != "sync_dir" and not name.startswith("manifest.json"):
            state = "swap" if kind == "overwrite" else "cleanup"
        elif state in ("swap", "cleanup") and "/data" not in path:
            state = "retention"
        out.append(state)
    return out


def dry_run(sc: Scenario, place: Place) -> tuple[list[list[dict[str, Any]]], float]:
    """Every rank's traced calls of an un-armed save of ``sc``, and the save's seconds."""
    with tempfile.TemporaryDirectory() as d:
        codes = run_scenario(sc, place, trace_dir=d)
        assert codes == [0] * sc.ranks, f"{sc}: dry run failed: exit codes {codes}"
        traces = [json.load(open(os.path.join(d, f"r{r}.json"))) for r in range(sc.ranks)]
    return [t["calls"] for t in traces], max(t["seconds"] for t in traces)


def spread(n: int, k: int) -> list[int]:
    """``k`` call indices (1-based) spread evenly over ``1..n`` (all if ``k >= n``)."""
    if k >= n:
        return list(range(1, n + 1))
    return sorted({1 + round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [1]


def choose_points(phases: list[str], k: int) -> list[int]:
    """About ``k`` call indices (1-based) with every phase represented: up to
    ``k / phases`` (at least 1) spread over each phase's calls (all if ``k`` covers them)."""
    if k >= len(phases):
        return list(range(1, len(phases) + 1))
    groups: dict[str, list[int]] = {}
    for i, phase in enumerate(phases, 1):
        groups.setdefault(phase, []).append(i)
    per = max(1, k // len(groups))
    return sorted({idxs[j - 1] for idxs in groups.values() for j in spread(len(idxs), per)})


# ----------------------------------------------------------------------------- outcome


def try_load(place: Place, step: int) -> dict[str, Any] | ShardckptError:
    out = blank_state()
    try:
        shardckpt.load({"state": out}, place.step(step), storage_options=place.options)
    except ShardckptError as e:
        return e
    return out


def setup_root(place: Place) -> None:
    for step, state in ((1, A), (2, B)):
        shardckpt.save({"state": state}, place.step(step), metadata={"step": step},
                       storage_options=place.options)


def check_outcome(sc: Scenario, place: Place, replay: str, take_over: bool = False,
                  replaced_lost_ok: bool = False) -> bool:
    """The invariants after a kill; returns whether the new checkpoint was committed.
    ``replaced_lost_ok``: the failure came after an overwrite replaced the old
    manifest, so the step may be incomplete (never torn)."""
    t = sc.target
    got = try_load(place, t)
    allowed = [C, B] if sc.kind == "overwrite" else [C]
    if isinstance(got, ShardckptError):
        assert sc.kind != "overwrite" or replaced_lost_ok, \
            f"{replay}: overwritten step {t} lost its committed state: {got!r}"
        committed = False
    else:
        assert any(same(got, s) for s in allowed), f"{replay}: step {t} loads but is torn (no allowed state)"
        committed = same(got, C)
    # earlier committed steps
    for step, state in ((1, A), (2, B)):
        if step == t:
            continue
        earlier = try_load(place, step)
        if sc.kind == "retention" and step == 1 and isinstance(earlier, ShardckptError):
            assert committed, f"{replay}: step 1 deleted though step {t} never committed: {earlier!r}"
            continue
        assert not isinstance(earlier, ShardckptError), f"{replay}: earlier step {step} lost: {earlier!r}"
        assert same(earlier, state), f"{replay}: earlier step {step} loads other bytes"
    # a manager over the root restores the newest valid step, then saves there again
    mgr = shardckpt.CheckpointManager(place.root, storage_options=place.options, take_over_lock=take_over)
    try:
        out = blank_state()
        step = mgr.restore(out)
        want = (t, C) if committed else (2, B)
        if not committed and isinstance(got, ShardckptError) and sc.kind == "overwrite":
            want = (1, A)
        assert step == want[0] and same(out, want[1]), f"{replay}: restore gave step {step}, want {want[0]}"
        mgr.save(t, D)
    finally:
        mgr.close()
    again = try_load(place, t)
    assert not isinstance(again, ShardckptError) and same(again, D), f"{replay}: new save to step {t} failed"
    return committed


# ----------------------------------------------------------------------------- places


@pytest.fixture
def places(tmp_path: Any, request: Any) -> Iterator[Callable[[str], Place]]:
    """A fresh root per call: ``places("local")`` / ``places("s3")``."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # before forking: no intra-op pool for the children to inherit
    counter = iter(range(10**9))

    def make(backend: str) -> Place:
        n = next(counter)
        if backend == "local":
            return Place(str(tmp_path / f"root{n}"), None)
        bucket = request.getfixturevalue("s3_bucket")
        return Place(bucket.url(f"r{n}-{uuid.uuid4().hex[:6]}").rstrip("/"), bucket.storage_options)

    yield make
    torch.set_num_threads(torch_threads)


def sweep(sc: Scenario, places: Callable[[str], Place], per_rank: int) -> int:
    """Kill ``sc`` at ``per_rank`` call indices of each rank spread over its dry-run
    trace; check the outcome after each; record the counts per phase."""
    place = places(sc.backend)
    setup_root(place)
    traces, _ = dry_run(sc, place)
    tried: dict[str, list[int]] = {}
    for victim, calls in enumerate(traces):
        phases = label_phases(calls, sc.kind)
        for at in choose_points(phases, per_rank):
            replay = f"scenario={sc} victim=rank{victim} kill_at_call={at} ({calls[at - 1]['site']} " \
                     f"{calls[at - 1]['path']}, phase {phases[at - 1]})"
            place = places(sc.backend)
            setup_root(place)
            codes = run_scenario(sc, place, victim=victim, at=at)
            assert codes[victim] == -signal.SIGKILL, f"{replay}: the kill did not fire (exit codes {codes})"
            check_outcome(sc, place, replay)
            tried.setdefault(phases[at - 1], []).append(at)
    for phase, ats in tried.items():
        record("kill points", phase=phase, backend=sc.backend, ranks=sc.ranks, mode=sc.mode, kind=sc.kind,
               tried=len(ats), torn_loadable=0, earlier_lost=0)
    return sum(len(v) for v in tried.values())


def random_kills(sc: Scenario, places: Callable[[str], Place], n: int, seed: int) -> int:
    """``n`` SIGKILLs of all ranks at seeded random instants within the save (up to
    1.2 times the dry run's duration); returns how many left the new step committed.

    Besides ``check_outcome`` after each kill, the count must fit where the kills
    fell: a save whose ranks all finished before the kill must be committed (so
    ``committed`` is at least the number of such runs), a rank may only finish or be
    killed, never fail on its own, and at least one kill must have interrupted the
    save before its commit (otherwise no kill tested anything)."""
    place = places(sc.backend)
    setup_root(place)
    _, seconds = dry_run(sc, place)
    rng = random.Random(f"{seed}-{sc}")
    committed = finished = 0
    for i in range(n):
        delay = rng.uniform(0.0, seconds * 1.2)
        replay = f"scenario={sc} random kill #{i} seed={seed} delay={delay:.6f}s"
        place = places(sc.backend)
        setup_root(place)
        codes = run_scenario(sc, place, kill_after=delay)
        assert set(codes) <= {0, -signal.SIGKILL}, f"{replay}: a rank failed by itself (exit codes {codes})"
        new = check_outcome(sc, place, replay)
        if codes == [0] * sc.ranks:  # the save returned on every rank before the kill came
            assert new, f"{replay}: every rank's save returned, yet step {sc.target} is not committed"
            finished += 1
        committed += new
    assert finished <= committed < n, (
        f"{sc}: {committed} of {n} kills found the new step committed ({finished} came after every rank "
        f"had finished); at least one must interrupt the save before its commit")
    record("kill points", phase="random", backend=sc.backend, ranks=sc.ranks, mode=sc.mode, kind=sc.kind,
           tried=n, torn_loadable=0, earlier_lost=0, committed=committed)
    return committed


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("kind", KINDS)
def test_kill_at_every_call_local_1rank(places, kind, mode):
    assert sweep(Scenario("local", 1, mode, kind), places, per_rank=1000) >= 15


def test_random_kills_local_1rank(places):
    for mode in ("sync", "async"):
        random_kills(Scenario("local", 1, mode, "retention"), places, n=12, seed=SEED)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("kind", KINDS)
def test_kill_points_local_2ranks(places, kind, mode):
    assert sweep(Scenario("local", 2, mode, kind), places, per_rank=12) >= 8


@pytest.mark.slow
def test_random_kills_local_2ranks(places):
    random_kills(Scenario("local", 2, "async", "overwrite"), places, n=8, seed=SEED)


@pytest.mark.s3
@pytest.mark.parametrize("kind", [k if k == "fresh" else pytest.param(k, marks=pytest.mark.slow) for k in KINDS])
def test_kill_points_s3_1rank_sync(places, kind):
    # default run: about one point per phase; the slow run: all kinds, more points
    assert sweep(Scenario("s3", 1, "sync", kind), places, per_rank=6 if kind == "fresh" else 16) >= 5


@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_kill_points_s3_1rank_async(places, kind):
    assert sweep(Scenario("s3", 1, "async", kind), places, per_rank=10) >= 5


@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_points_s3_2ranks(places, mode):
    assert sweep(Scenario("s3", 2, mode, "overwrite"), places, per_rank=8) >= 8


@pytest.mark.s3
@pytest.mark.slow
def test_random_kills_s3(places):
    random_kills(Scenario("s3", 1, "sync", "fresh"), places, n=5, seed=SEED)


def test_choose_points_covers_every_phase():
    phases = ["planning"] * 5 + ["writing"] * 40 + ["manifest"] * 3 + ["retention"] * 6
    chosen = choose_points(phases, 8)
    assert {phases[i - 1] for i in chosen} == {"planning", "writing", "manifest", "retention"}
    assert len(chosen) <= 8 and choose_points(phases, 100) == list(range(1, 55))


def test_phase_labels_cover_every_phase():
    calls = [{"site": s, "path": p} for s, p in [
        ("create_exclusive", "r/.shardckpt-owner"), ("listdir", "r/step_3"), ("put", "r/step_3/data/x.probe"),
        ("open_writer", "r/step_3/data/x.bin"), ("writer.write", "r/step_3/data/x.bin"),
        ("writer.close", "r/step_3/data/x.bin"), ("size", "r/step_3/data/x.bin"),
        ("put", "r/step_3/manifest.json.tmp"), ("rename", "r/step_3/manifest.json"), ("sync_dir", "r/step_3"),
        ("listdir", "r/step_3/data"), ("remove", "r/step_3/data/x.probe"), ("listdir", "r"),
        ("remove", "r/step_1/manifest.json")]]
    assert label_phases(calls, "overwrite") == [
        "owner", "planning", "planning", "writing", "writing", "writeback", "writeback", "manifest", "manifest",
        "manifest", "swap", "swap", "retention", "retention"]
