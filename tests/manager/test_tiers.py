"""Multi-tier checkpoints without real nodes: replica placement and restore planning
(pure), the commit marker, and the manager with a local tier in one process and in
two gloo ranks on one node (replicas skipped), retention per tier, list() tiers,
bad arguments. Real nodes: ``tests/multinode/test_tiers_multinode.py``."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
import torch.distributed as dist

from shardckpt import CheckpointManager
from shardckpt.errors import CorruptCheckpointError, IncompleteCheckpointError
from shardckpt.manager.tiers import COMMIT_NAME, LocalCommit, replica_targets
from shardckpt.manager.tiers.candidates import (
    NodeReport,
    StepFiles,
    local_candidates,
)
from shardckpt.manager.tiers.local_commit import decode_commit, encode_commit
from tests.manager.test_manager import Tiny, run
from tests.multiproc import run_multiprocess


@pytest.mark.parametrize("nodes,k", [
    (["a", "a", "b", "b"], 1),
    (["a", "b", "c"], 2),
    (["a", "a", "a", "b", "c", "c"], 2),  # uneven nodes
    (["a", "b"], 5),  # capped at one copy
])
def test_replicas_never_share_a_node_and_spread(nodes, k):
    targets = replica_targets(nodes, k)
    assert len(targets) == len(nodes), targets  # one target list per rank: the loop below sees them all
    copies = min(k, len(set(nodes)) - 1)
    for rank, ts in enumerate(targets):
        assert len(ts) == copies
        assert len({nodes[t] for t in ts}) == copies  # one per node
        assert nodes[rank] not in {nodes[t] for t in ts}
    if len(set(nodes)) == len(nodes) or nodes == ["a", "a", "b", "b"]:  # even: every rank holds k copies
        assert sorted(t for ts in targets for t in ts) == sorted(list(range(len(nodes))) * copies)


def test_single_node_has_no_replicas():
    assert replica_targets(["a", "a", "a"], 1) == [[], [], []]


def _commit(step=30, world=4, manifests=(1, 2, 3, 4), layouts=("x",) * 4):
    return LocalCommit(step, world, ("n0", "n0", "n1", "n1"), ((2,), (3,), (0,), (1,)), tuple(layouts),
                       tuple(manifests), {"loss": 0.5}, 123.0)


def test_marker_round_trip_and_damage_names_the_file():
    c = _commit()
    assert decode_commit(encode_commit(c), "f") == c
    data = encode_commit(c)
    with pytest.raises(CorruptCheckpointError, match="step_30/COMMIT.json.*CRC32C") as ei:
        decode_commit(data.replace(b'"world_size":4', b'"world_size":5'), "step_30/COMMIT.json")
    assert ei.value.file == "step_30/COMMIT.json"
    for bad in (b"", data[:-5], b"[1]", data.replace(b'"step":30', b'"step": 30')):
        with pytest.raises(CorruptCheckpointError, match="local commit marker is damaged"):
            decode_commit(bad, "m")


def _reports(nodes, files, digests=None):
    seen: set[str] = set()
    out = []
    for rank, n in enumerate(nodes):
        first = n not in seen
        seen.add(n)
        out.append(NodeReport(n, (digests or ["x"] * len(nodes))[rank], files.get(n, {}) if first else None))
    return out


def test_plan_replaced_node_fetches_from_peers_and_stale_copies_never_count():
    c = _commit()
    full = {30: StepFiles(c, {0: 1, 1: 2, 2: 3, 3: 4})}
    # node n1 replaced by an empty node: its ranks fetch from n0, which holds copies
    (cand,), why = local_candidates(_reports(["n0", "n0", "n1", "n1"], {"n0": full}))
    assert cand.step == 30 and cand.fetch == {2: 0, 3: 1} and cand.nodes_without_marker == ("n1",) and not why
    # a copy of rank 3 from an earlier save of this step (another manifest CRC) does not count
    stale = {30: StepFiles(c, {0: 1, 1: 2, 2: 3, 3: 99})}
    cands, why = local_candidates(_reports(["n0", "n0", "n1", "n1"], {"n0": stale}))
    assert cands == [] and "rank(s) [3]" in why[30]


def test_plan_reasons_world_size_layout_marker():
    c = _commit()
    files = {"n0": {30: StepFiles(c, {0: 1, 1: 2, 2: 3, 3: 4}), 40: StepFiles(None, {0: 9})}}
    cands, why = local_candidates(_reports(["n0", "n0", "n1"], files))
    assert cands == [] and "world size 4" in why[30] and "no commit marker" in why[40]
    cands, why = local_candidates(_reports(["n0", "n0", "n1", "n1"], files, ["x", "x", "y", "x"]))
    assert cands == [] and "rank(s) [2]" in why[30] and "shapes/placements" in why[30]


def _tiers_mgr(tmp_path, **kw):
    args = dict(local_root=str(tmp_path / "local"), persist_interval_steps=4, keep_last=2, local_keep_last=2)
    args.update(kw)
    return CheckpointManager(str(tmp_path / "remote"), **args)


@pytest.mark.parametrize("async_save", [True, False])
def test_single_process_tiers_retention_list_and_restore(tmp_path, caplog, async_save):
    caplog.set_level(logging.INFO, logger="shardckpt.manager")
    with _tiers_mgr(tmp_path, async_save=async_save) as mgr:
        state = run(mgr, range(1, 11))
        state.set(99)  # after save returned: must not reach any tier
        mgr.wait()
        listed = [(c.step, c.status, c.tiers) for c in mgr.list()]
    assert "no peer replicas" in caplog.text
    # remote: persisted steps 4 and 8 (keep_last=2); local: the 2 newest saves, 9 and 10
    assert listed == [(4, "valid", ("remote",)), (8, "valid", ("remote",)), (9, "valid", ("local",)),
                      (10, "valid", ("local",))]
    assert sorted(os.listdir(tmp_path / "local" / "step_0000000010")) == [COMMIT_NAME, "rank_00000"]
    caplog.clear()
    state = Tiny()
    with _tiers_mgr(tmp_path) as mgr:
        assert mgr.restore(state) == 10
    assert state.count == 100 and torch.equal(state.w, torch.arange(64.0) + 10)
    assert "restored step 10 from the local tier" in caplog.text


def test_local_step_damaged_or_lost_falls_back_across_tiers(tmp_path, caplog):
    with _tiers_mgr(tmp_path) as mgr:
        run(mgr, range(1, 11))
    shard = next((tmp_path / "local" / "step_0000000010" / "rank_00000" / "data").glob("*.bin"))
    with open(shard, "r+b") as f:  # a flipped bit: found by the load's CRC check
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 1]))
    caplog.set_level(logging.INFO, logger="shardckpt.manager")
    state = Tiny()
    with _tiers_mgr(tmp_path) as mgr:
        assert mgr.restore(state) == 9  # the previous local step, still newer than remote 8
    assert "local step 10 is corrupt" in caplog.text and torch.equal(state.w, torch.arange(64.0) + 9)
    # a damaged marker: listed as corrupt naming the file; restore goes on to the next step
    marker = tmp_path / "local" / "step_0000000009" / COMMIT_NAME
    marker.write_bytes(marker.read_bytes().replace(b'"step":9', b'"step":7'))
    with _tiers_mgr(tmp_path) as mgr:
        by_step = {c.step: c for c in mgr.list()}
        assert by_step[9].status == "corrupt" and str(marker) in by_step[9].reason
        assert mgr.restore(state) == 8 and torch.equal(state.w, torch.arange(64.0) + 8)
    assert "restoring from the durable tier" in caplog.text


def test_only_unusable_local_steps_and_no_remote_refuses_a_fresh_start(tmp_path):
    with _tiers_mgr(tmp_path, persist_interval_steps=None) as mgr:
        run(mgr, [1, 2])
    for step in (1, 2):
        os.remove(tmp_path / "local" / f"step_{step:010d}" / COMMIT_NAME)
    with _tiers_mgr(tmp_path, persist_interval_steps=None) as mgr, \
            pytest.raises(IncompleteCheckpointError, match="refusing to start fresh") as ei:
        mgr.restore(Tiny())
    assert set(ei.value.reasons) == {1, 2}


def test_bad_tier_arguments(tmp_path):
    remote = str(tmp_path / "r")
    for kw, match in [
        ({"local_replicas": 2}, "need local_root"),
        ({"persist_interval_steps": 5}, "need local_root"),
        ({"local_root": str(tmp_path / "l"), "local_keep_last": 0}, "local_keep_last"),
        ({"local_root": str(tmp_path / "l"), "local_replicas": -1}, "local_replicas"),
        ({"local_root": str(tmp_path / "l"), "persist_interval_steps": 0}, "persist_interval_steps"),
        ({"local_root": remote}, "must differ"),
        ({"local_root": "memory://x/y"}, "node-local storage"),
        ({"local_root": str(tmp_path / "l"), "read_only": True}, "read_only"),
    ]:
        with pytest.raises(ValueError, match=match):
            CheckpointManager(remote, **kw)
    with CheckpointManager(remote, local_root=str(tmp_path / "l")) as mgr:
        with pytest.raises(TypeError, match="'st' is a _Odd"):
            mgr.save(1, {"st": torch.zeros(2).as_subclass(_Odd)})


class _Odd(torch.Tensor):
    """A tensor subclass the local tier cannot store as a plain shard."""


def _two_ranks_one_node(rank, world, tmp):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))

    def sd(step, zeros=False):
        g = torch.Generator().manual_seed(step)
        full = torch.randn(9, 3, generator=g) * (0 if zeros else 1)
        return {"w": distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None),
                "r": distribute_tensor(full + 1, mesh, [Replicate()], src_data_rank=None),
                "n": -1 if zeros else step}

    kw = dict(local_root=f"{tmp}/local", persist_interval_steps=2, async_save=True, save_interval_steps=1)
    with CheckpointManager(f"{tmp}/remote", **kw) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, sd(step))
        mgr.wait()
        dist.barrier()  # the node's first rank has finished local retention (list() is per rank)
        listed = [(c.step, c.tiers) for c in mgr.list()]
    assert listed == [(2, ("local", "remote")), (3, ("local",))], listed
    got = sd(0, zeros=True)
    with CheckpointManager(f"{tmp}/remote", **kw) as mgr:
        assert mgr.restore(got) == 3
    want = sd(3)
    assert got["n"] == 3 and torch.equal(got["w"].to_local(), want["w"].to_local())
    assert torch.equal(got["r"].to_local(), want["r"].to_local())
    # the durable copy of step 2 is a normal resharded checkpoint: load it at this world size
    import shardckpt

    two = sd(0, zeros=True)
    shardckpt.load({"state": two}, f"{tmp}/remote/step_0000000002")
    assert torch.equal(two["w"].full_tensor(), sd(2)["w"].full_tensor()) and two["n"] == 2
    if rank == 0:
        local = sorted(os.listdir(f"{tmp}/local/step_0000000003"))
        assert local == [COMMIT_NAME, "rank_00000", "rank_00001"], local
        marker = json.loads(open(f"{tmp}/local/step_0000000003/{COMMIT_NAME}").read())
        assert marker["replicas"] == [[], []] and marker["world_size"] == 2
    dist.barrier()


def test_two_ranks_on_one_node_dtensors_round_trip_without_replicas(tmp_path):
    run_multiprocess(_two_ranks_one_node, 2, str(tmp_path), timeout=120)


def test_shardckpt_ls_shows_each_steps_tiers(tmp_path, capsys):
    from shardckpt.cli import main

    with _tiers_mgr(tmp_path) as mgr:
        run(mgr, range(1, 11))
    remote, local = str(tmp_path / "remote"), str(tmp_path / "local")
    assert main(["ls", remote, "--local-root", local, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [(r["step"], r["status"], r["tiers"]) for r in rows] == [
        (4, "valid", ["remote"]), (8, "valid", ["remote"]), (9, "valid", ["local"]), (10, "valid", ["local"])]
    assert main(["ls", local]) == 0  # a local root on its own is recognised as one
    out = capsys.readouterr().out
    assert "TIERS" in out and [line.split()[:3] for line in out.splitlines()[1:3]] == [
        ["9", "valid", "local"], ["10", "valid", "local"]]


@pytest.mark.s3
def test_s3_durable_tier_restores_when_the_local_tier_is_gone(tmp_path, s3_bucket, caplog):
    url, opts = s3_bucket.url("tiers/run"), s3_bucket.storage_options
    kw = dict(local_root=str(tmp_path / "local"), persist_interval_steps=3, storage_options=opts, async_save=True)
    with CheckpointManager(url, **kw) as mgr:
        run(mgr, range(1, 5))
        mgr.wait()
        assert [(c.step, c.tiers) for c in mgr.list()] == [(3, ("local", "remote")), (4, ("local",))]
    import shutil

    shutil.rmtree(tmp_path / "local")  # the node (and its local tier) is gone
    caplog.set_level(logging.INFO, logger="shardckpt.manager")
    state = Tiny()
    with CheckpointManager(url, **kw) as mgr:
        assert mgr.restore(state) == 3
    assert torch.equal(state.w, torch.arange(64.0) + 3) and state.count == 30
    assert "restored step 3 from s3://" in caplog.text


def test_preemption_saves_to_both_tiers_and_exits(tmp_path):
    import signal

    mgr = _tiers_mgr(tmp_path, persist_interval_steps=100, async_save=True)
    mgr.install_signal_handlers()
    state = run(mgr, [1, 2])  # local only
    os.kill(os.getpid(), signal.SIGTERM)  # the handler only records it
    state.set(3)
    assert mgr.should_save(3)
    with pytest.raises(SystemExit) as ei:
        mgr.save(3, state)
    assert ei.value.code == 128 + signal.SIGTERM
    with _tiers_mgr(tmp_path, persist_interval_steps=100) as again:
        assert [(c.step, c.tiers) for c in again.list()] == [(2, ("local",)), (3, ("local", "remote"))]


def _fsdp_train_state(rank, world, tmp):
    import shardckpt
    from tests.multirank.test_fsdp import _fsdp, _train

    def snapshot(model, optim):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optim)
        flat = {f"m.{k}": v for k, v in msd.items()}
        flat.update({f"o.{k}.{n}": t for k, s in osd["state"].items() for n, t in s.items()})
        return {k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in flat.items()}

    model, optim = _fsdp(world, seed=0)
    _train(rank, model, optim)
    state = shardckpt.TrainState(model=model, optimizer=optim)
    kw = dict(local_root=f"{tmp}/local", persist_interval_steps=10, async_save=True)
    with CheckpointManager(f"{tmp}/remote", **kw) as mgr:
        mgr.save(3, state)
        saved = snapshot(model, optim)
        _train(rank, model, optim)  # the state moves on after save returned
        mgr.wait()
    fresh, fresh_optim = _fsdp(world, seed=1)
    _train(rank, fresh, fresh_optim)  # optimizer state exists, with other values
    state = shardckpt.TrainState(model=fresh, optimizer=fresh_optim)
    with CheckpointManager(f"{tmp}/remote", **kw) as mgr:
        assert mgr.restore(state) == 3
    got = snapshot(fresh, fresh_optim)
    assert saved.keys() == got.keys()
    for k in saved:
        assert torch.equal(saved[k], got[k]), k


def test_fsdp2_train_state_restores_from_the_local_tier_bitwise(tmp_path):
    run_multiprocess(_fsdp_train_state, 2, str(tmp_path), timeout=180)


def test_failed_local_save_is_raised_and_leaves_the_previous_step(tmp_path):
    from shardckpt.errors import CheckpointWriteError

    with _tiers_mgr(tmp_path, persist_interval_steps=None, async_save=True) as mgr:
        run(mgr, [1])
        mgr.wait()
        (tmp_path / "local" / "step_0000000002").write_text("in the way")  # a file where the step goes
        run(mgr, [2])  # the failure happens in the background ...
        with pytest.raises(CheckpointWriteError, match="step_0000000002/rank_00000"):  # names the place
            mgr.wait()  # ... and is raised here
        assert [(c.step, c.status) for c in mgr.list() if c.status == "valid"] == [(1, "valid")]
    state = Tiny()
    with _tiers_mgr(tmp_path, persist_interval_steps=None) as mgr:
        assert mgr.restore(state) == 1 and state.count == 10


def test_never_older_than_a_usable_local_step_when_the_newer_durable_one_is_damaged(tmp_path, caplog):
    import shutil

    from tests.manager.test_manager import flip_shard_byte

    with _tiers_mgr(tmp_path) as mgr:
        run(mgr, range(1, 13))  # local 11, 12; durable 8, 12
    shutil.rmtree(tmp_path / "local" / "step_0000000012")
    flip_shard_byte(str(tmp_path / "remote"), 12)
    caplog.set_level(logging.INFO, logger="shardckpt.manager")
    state = Tiny()
    with _tiers_mgr(tmp_path) as mgr:
        assert mgr.restore(state) == 11  # not the durable step 8
    assert torch.equal(state.w, torch.arange(64.0) + 11) and "restored step 11 from the local tier" in caplog.text
