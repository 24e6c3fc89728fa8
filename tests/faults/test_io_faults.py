"""I/O faults at every call site in turn, through the ``fault://`` backend.

Write side: a save (fresh, overwrite, or a manager save with retention; sync
and async) is traced once, then re-run with ``EIO``, ``EACCES`` or a short
write (a prefix stored, nothing reported) at each of its calls. Each run either
raises a typed ``ShardckptError`` and commits nothing (an overwritten step keeps
its old state), or succeeds and the step loads bitwise; then the common outcome
checks of the kill-point suite hold (earlier steps bitwise, restore picks the
newest valid step, a new save there succeeds).

Read side: ``load`` and ``verify`` of a committed checkpoint with ``EIO``,
``EACCES``, a short read (a prefix filled, nothing reported) or ``EOFError`` at
each read call: a typed error, and no tensor of the destination left holding a
mix of its old and the checkpoint's bytes.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
import torch

import shardckpt
from shardckpt import knobs
from shardckpt.errors import ShardckptError
from shardckpt.store import step_dirname
from tests import faultstore
from tests.faults.test_kill_points import (
    CHUNK_BYTES,
    Place,
    Scenario,
    blank_state,
    check_outcome,
    child_save,
    make_state,
    places,  # noqa: F401 - the fixture place_of builds on
    same,
    setup_root,
    try_load,
)
from tests.figures import record

WRITE_FAULTS = ("eio", "eacces", "short")
READ_FAULTS = ("eio", "eacces", "short", "eof")


def _applies(fault: str, site: str) -> bool:
    if fault == "short":
        return site in faultstore.SHORT_SITES
    if fault == "eof":
        return site == "reader.read_into"
    return True


@pytest.fixture
def place_of(request: Any):
    yield request.getfixturevalue("places")  # test_kill_points' roots; disarmed after each test
    faultstore.disarm()


def _traced(fn: Any) -> list[faultstore.Call]:
    faultstore.arm(None)
    try:
        fn()
    finally:
        calls = faultstore.trace()
        faultstore.disarm()
    return calls


# ----------------------------------------------------------------------------- write faults


def write_sweep(sc: Scenario, place_of: Any, faults: tuple[str, ...] = WRITE_FAULTS) -> int:
    place = place_of(sc.backend)
    setup_root(place)
    with knobs.override(chunk_bytes=CHUNK_BYTES):
        calls = _traced(lambda: child_save(sc, place))
    replaced = next((c.index for c in calls if c.site in ("put", "rename")
                     and c.path.endswith("/manifest.json")), len(calls) + 1)
    counts: dict[tuple[str, str], list[int]] = {}
    for call in calls:
        for fault in faults:
            if not _applies(fault, call.site):
                continue
            replay = f"scenario={sc} fault={fault} at_call={call.index} ({call.site} {call.path})"
            place = place_of(sc.backend)
            setup_root(place)
            faultstore.arm(fault, call.index)
            error: BaseException | None = None
            try:
                with knobs.override(chunk_bytes=CHUNK_BYTES):
                    child_save(sc, place)
            except Exception as e:  # noqa: BLE001 - judged below
                error = e
            finally:
                hit = faultstore.fired()
                faultstore.disarm()
            assert hit is not None and hit.index == call.index, f"{replay}: the fault did not fire ({hit})"
            assert error is None or isinstance(error, ShardckptError), \
                f"{replay}: untyped error {type(error).__name__}: {error}"
            lost_ok = call.index > replaced or call.index == replaced and fault == "short"
            committed = check_outcome(sc, place, replay, take_over=True, replaced_lost_ok=lost_ok)
            if error is not None:
                assert not committed, f"{replay}: the save raised {error!r} but step {sc.target} is committed"
            else:
                assert committed, f"{replay}: the save reported success but step {sc.target} is not committed"
            counts.setdefault((fault, call.site), []).append(call.index)
    for (fault, site), idx in counts.items():
        record("io faults", fault=fault, site=site, backend=sc.backend, mode=sc.mode, kind=sc.kind, side="write",
               tried=len(idx), untyped=0, committed=0, partial_tensor=0)
    return sum(len(v) for v in counts.values())


@pytest.mark.parametrize(("kind", "mode"), [
    ("fresh", "sync"), ("overwrite", "sync"), ("retention", "sync"), ("fresh", "async"),
    pytest.param("overwrite", "async", marks=pytest.mark.slow),
    pytest.param("retention", "async", marks=pytest.mark.slow)])
def test_write_faults_local(place_of, kind, mode):
    assert write_sweep(Scenario("local", 1, mode, kind), place_of) >= 30


@pytest.mark.s3
@pytest.mark.slow
def test_write_faults_s3(place_of):
    assert write_sweep(Scenario("s3", 1, "sync", "overwrite"), place_of, faults=("eio", "short")) >= 15


# ----------------------------------------------------------------------------- read faults


SENTINEL = 7


def _sentinel_state() -> dict[str, Any]:
    out = blank_state()
    for v in out.values():
        if isinstance(v, torch.Tensor):
            v.fill_(SENTINEL)
    return out


def _partial(dest: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """Keys whose tensor is neither all-sentinel nor bitwise the saved one."""
    bad = []
    for k, v in dest.items():
        if isinstance(v, torch.Tensor):
            untouched = bool((v == SENTINEL).all())
            if not untouched and not torch.equal(v.view(torch.uint8), saved[k].view(torch.uint8)):
                bad.append(k)
    return bad


def read_sweep(place: Place, what: str, **knob: int) -> int:
    """Fault every read call of ``load`` (or ``verify``) of step 2 (state ``make_state(2)``)."""
    saved = make_state(2)
    url = faultstore.url(place.step(2))

    def run() -> dict[str, Any]:
        dest = _sentinel_state()
        if what == "load":
            shardckpt.load({"state": dest}, url, storage_options=place.options)
        else:
            shardckpt.verify(url, storage_options=place.options)
        return dest

    with knobs.override(**knob):
        calls = _traced(run)
        counts: dict[tuple[str, str], int] = {}
        nth: dict[str, int] = {}
        for call in calls:
            # armed by (site, n-th call of it): reads run on a thread pool, so the
            # process-wide call order differs between runs, the per-site count does not
            nth[call.site] = nth.get(call.site, 0) + 1
            for fault in READ_FAULTS:
                if not _applies(fault, call.site):
                    continue
                replay = f"{what} from {place.root} fault={fault} at_call={call.index} ({call.site} {call.path}) {knob}"
                dest = _sentinel_state()
                faultstore.arm(fault, nth[call.site], site=call.site)
                error: BaseException | None = None
                try:
                    if what == "load":
                        shardckpt.load({"state": dest}, url, storage_options=place.options)
                    else:
                        shardckpt.verify(url, storage_options=place.options)
                except Exception as e:  # noqa: BLE001 - judged below
                    error = e
                finally:
                    hit = faultstore.fired()
                    faultstore.disarm()
                assert hit is not None, f"{replay}: the fault never fired"
                assert error is None or isinstance(error, ShardckptError), \
                    f"{replay}: untyped error {type(error).__name__}: {error}"
                if what == "load":
                    if error is None:
                        assert same(dest, saved), f"{replay}: load succeeded with other bytes"
                    partial = _partial(dest, saved)
                    assert not partial, f"{replay}: {error!r} left partial tensors {partial}"
                assert fault in ("short",) or error is not None or call.site in ("exists", "listdir"), \
                    f"{replay}: a failed read went unnoticed"
                counts[(fault, call.site)] = counts.get((fault, call.site), 0) + 1
    for (fault, site), n in counts.items():
        record("io faults", fault=fault, site=site, backend="s3" if place.options else "local", side=what,
               tried=n, untyped=0, committed=0, partial_tensor=0)
    assert not isinstance(try_load(place, 2), ShardckptError), f"{place.root}: step 2 damaged by reading it"
    return sum(counts.values())


@pytest.mark.parametrize("what", ["load", "verify"])
def test_read_faults_local(place_of, what):
    place = place_of("local")
    with knobs.override(chunk_bytes=CHUNK_BYTES):
        setup_root(place)
    assert read_sweep(place, what) >= 10


def test_read_faults_inside_a_large_tensor_raise_and_a_retry_loads_it(place_of):
    """A tensor larger than ``knobs.max_read_bytes`` is read piece by piece straight
    into its destination (memory stays bounded), so a fault in a later piece leaves
    that destination partly overwritten: the load raises a typed error, never
    returns, and the next load (or the manager's restore) fills it completely.
    Tensors within ``max_read_bytes`` are never left partial (``read_sweep``)."""
    place = place_of("local")
    with knobs.override(chunk_bytes=CHUNK_BYTES):
        setup_root(place)
    saved = make_state(2)
    url = faultstore.url(place.step(2))
    with knobs.override(max_read_bytes=CHUNK_BYTES):
        calls = [c for c in _traced(lambda: shardckpt.load({"state": _sentinel_state()}, url,
                                                           storage_options=place.options))
                 if c.site == "reader.read_into"]
        assert len(calls) >= 2
        for call in calls:
            dest = _sentinel_state()
            faultstore.arm("eio", call.index)
            try:
                with pytest.raises(ShardckptError):
                    shardckpt.load({"state": dest}, url, storage_options=place.options)
            finally:
                faultstore.disarm()
            shardckpt.load({"state": dest}, url, storage_options=place.options)
            assert same(dest, saved), f"retry after a fault at call {call.index} did not load step 2"
    # partial_tensor is not counted here: a piecewise destination is partly written by design
    record("io faults", fault="eio", site="reader.read_into (tensor > max_read_bytes)", backend="local",
           side="load, then retry", tried=len(calls), untyped=0)


@pytest.mark.s3
@pytest.mark.slow
def test_read_faults_s3(place_of):
    place = place_of("s3")
    with knobs.override(chunk_bytes=CHUNK_BYTES):
        setup_root(place)
    assert read_sweep(place, "load") >= 10


# ----------------------------------------------------------------------------- the backend itself


def test_faultstore_numbers_calls_and_fires_once(tmp_path):
    url = faultstore.url(tmp_path / "x")
    s = shardckpt.backends.open_storage(url)
    assert isinstance(s, faultstore.FaultStorage) and s.url == url
    faultstore.arm("eio", 2)
    s.makedirs("")
    with pytest.raises(OSError) as info:
        s.put("a", b"abc")
    assert info.value.errno == errno.EIO
    s.put("a", b"abcd")  # fires once
    assert [c.site for c in faultstore.trace()] == ["makedirs", "put", "put"]
    faultstore.arm("short", 1, site="put")
    s.child("").put("b", b"abcd")
    assert s.read_bytes("b") == b"ab"
    faultstore.arm("eacces", 1, site="reader.read_into")
    with pytest.raises(PermissionError):
        s.open_reader("a").read_into(0, memoryview(bytearray(4)))
    faultstore.disarm()


# ----------------------------------------------------------------------------- regressions


def _root_with_two_steps(tmp_path: Any) -> Place:
    place = Place(str(tmp_path / "root"), None)
    setup_root(place)
    return place


def _save_c(place: Place, step: int, overwrite: bool = False) -> BaseException | None:
    try:
        shardckpt.save({"state": make_state(3)}, faultstore.url(place.step(step)), overwrite=overwrite,
                       metadata={"step": step})
    except Exception as e:  # noqa: BLE001 - judged by the caller
        return e
    finally:
        faultstore.disarm()
    return None


def test_dir_fsync_failure_after_rename_uncommits(tmp_path):
    # was: the manifest stayed renamed in while the save raised (reported failed, yet committed)
    place = _root_with_two_steps(tmp_path)
    calls = _traced(lambda: shardckpt.save({"state": make_state(3)}, faultstore.url(place.step(9))))
    n = [c for c in calls if c.site == "sync_dir"].index(
        next(c for c in calls if c.site == "sync_dir" and c.path.endswith(step_dirname(9)))) + 1
    faultstore.arm("eio", n, site="sync_dir")
    error = _save_c(place, 3)
    assert isinstance(error, shardckpt.CheckpointWriteError)
    assert isinstance(try_load(place, 3), (shardckpt.IncompleteCheckpointError, shardckpt.CheckpointNotFoundError))  # removed by abandon


@pytest.mark.parametrize("overwrite", [False, True])
def test_truncated_manifest_is_never_committed(tmp_path, overwrite):
    # was: a backend storing a prefix of manifest.json.tmp got it renamed in: save "succeeded", the step
    # was corrupt, and an overwrite lost the previous checkpoint
    place = _root_with_two_steps(tmp_path)
    step = 2 if overwrite else 3
    faultstore.arm("short", 2, site="put")  # 1: the probe, 2: manifest.json.tmp
    error = _save_c(place, step, overwrite=overwrite)
    assert isinstance(error, shardckpt.CheckpointWriteError) and "manifest" in str(error)
    got = try_load(place, step)
    if overwrite:
        assert not isinstance(got, ShardckptError) and same(got, make_state(2))
    else:
        assert isinstance(got, (shardckpt.IncompleteCheckpointError, shardckpt.CheckpointNotFoundError))


@pytest.mark.s3
def test_truncated_manifest_put_is_uncommitted_on_s3(s3_bucket):
    place = Place(s3_bucket.url("run").rstrip("/"), s3_bucket.storage_options)
    faultstore.arm("short", 2, site="put")  # 1: the probe, 2: manifest.json (the commit itself)
    try:
        shardckpt.save({"state": make_state(3)}, faultstore.url(place.step(3)), storage_options=place.options)
    except shardckpt.CheckpointWriteError as e:
        assert "manifest" in str(e)
    else:
        pytest.fail("a truncated manifest PUT was reported as a successful save")
    finally:
        faultstore.disarm()
    assert isinstance(try_load(place, 3), (shardckpt.IncompleteCheckpointError, shardckpt.CheckpointNotFoundError))


def test_listing_failure_after_commit_does_not_fail_the_save(tmp_path):
    # was: remove_unreferenced's listdir raised after the commit: save failed, checkpoint committed
    place = _root_with_two_steps(tmp_path)
    faultstore.arm("eio", 2, site="listdir")  # 1: prepare, 2: remove_unreferenced
    assert _save_c(place, 3) is None
    assert same(try_load(place, 3), make_state(3))


def test_owner_marker_io_errors_are_typed(tmp_path):
    # was: OSError from the owner marker's create/read escaped CheckpointManager() / save() untyped
    root = faultstore.url(tmp_path / "root")
    for site in ("makedirs", "create_exclusive"):
        faultstore.arm("eacces", 1, site=site)
        with pytest.raises(shardckpt.CheckpointWriteError, match="ownership"):
            shardckpt.CheckpointManager(root)
    faultstore.disarm()
    mgr = shardckpt.CheckpointManager(root)
    try:
        faultstore.arm("eio", 1, site="read_bytes")
        with pytest.raises(shardckpt.CheckpointWriteError, match="owner marker"):
            mgr.save(1, make_state(1))
    finally:
        faultstore.disarm()
        mgr.close()


def test_retention_looks_again_before_deleting_an_unusable_step(tmp_path):
    # was: one short read of step 2's manifest during the retention scan made it "corrupt": deleted
    def manager_save(place: Place) -> None:
        mgr = shardckpt.CheckpointManager(faultstore.url(place.root), keep_last=2)
        try:
            mgr.save(3, make_state(3))
        finally:
            mgr.close()

    dry, place = Place(str(tmp_path / "dry"), None), Place(str(tmp_path / "root"), None)
    setup_root(dry)
    setup_root(place)
    reads = [c for c in _traced(lambda: manager_save(dry)) if c.site == "read_bytes"]
    n = next(i for i, c in enumerate(reads, 1) if c.path.endswith(f"{step_dirname(2)}/manifest.json"))
    faultstore.arm("short", n, site="read_bytes")
    try:
        manager_save(place)
        assert faultstore.fired() is not None
    finally:
        faultstore.disarm()
    assert same(try_load(place, 2), make_state(2)) and same(try_load(place, 3), make_state(3))


@pytest.mark.parametrize("site", ["read_bytes", "size"])
def test_manifest_and_stat_read_errors_are_typed(tmp_path, site):
    # was: EIO reading manifest.json (load, restore) or stat-ing a shard (read_checked) was an untyped OSError
    place = _root_with_two_steps(tmp_path)
    ckpt = shardckpt.store.CheckpointDir.at(faultstore.url(place.step(2)))
    faultstore.arm("eio", 1, site=site)
    try:
        with pytest.raises(shardckpt.CheckpointReadError, match="Errno 5"):
            ckpt.read_checked()
    finally:
        faultstore.disarm()
    faultstore.arm("eio", 1, site="read_bytes")
    try:
        with pytest.raises(shardckpt.CheckpointReadError):
            shardckpt.load({"state": blank_state()}, faultstore.url(place.step(2)))
    finally:
        faultstore.disarm()
