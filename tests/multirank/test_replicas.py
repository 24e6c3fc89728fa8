"""Replica divergence: items several ranks save under one key must be identical."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

import shardckpt
from shardckpt.engine.planning import plan_globally, summarize
from shardckpt.engine.replicas import divergence_of, replica_key
from shardckpt.errors import CheckpointWriteError, ShardckptError
from tests.figures import record
from tests.multiproc import run_multiprocess


def _item(fqn: str, offset: tuple[int, ...] | None = None, numel: int = 4) -> WriteItem:
    if offset is None:
        return WriteItem(MetadataIndex(fqn), WriteItemType.BYTE_IO)
    size = torch.Size([2])
    chunk = ChunkStorageMetadata(torch.Size(offset), size)
    data = TensorWriteData(chunk, TensorProperties(dtype=torch.float32), torch.Size([numel]))
    return WriteItem(MetadataIndex(fqn, offset), WriteItemType.SHARD, tensor_data=data)


def _replicated(plans: list[SavePlan]) -> tuple[list[list[int]], list[list[tuple]]]:
    """What save planning marks for the replica check: per rank the positions of its
    items another rank holds too, and their cross-rank names."""
    summaries = [summarize(p) for p in plans]
    assignments, _ = plan_globally(summaries)
    positions = [sorted(a.replicated) for a in assignments]
    return positions, [[replica_key(s, i) for i in pos] for s, pos in zip(summaries, positions)]


def test_planning_marks_the_items_more_than_one_rank_holds():
    plans = [  # "a" (whole) and "step" on both ranks; "w" sharded; "only0" on rank 0 alone
        SavePlan([_item("a", (0,), numel=2), _item("step"), _item("w", (0,)), _item("only0")]),
        SavePlan([_item("w", (2,)), _item("step"), _item("a", (0,), numel=2)]),
    ]
    positions, held = _replicated(plans)
    assert positions == [[0, 1], [1, 2]]
    assert held == [[("a", (0,)), ("step", None)], [("step", None), ("a", (0,))]]


def test_divergence_names_keys_and_groups_ranks_by_copy():
    plans = [SavePlan([_item("a"), _item("b")]) for _ in range(3)]
    _, held = _replicated(plans)
    assert divergence_of(held, [[1, 7], [1, 7], [1, 7]]) is None
    found = divergence_of(held, [[1, 7], [2, 7], [1, 7]])
    assert found is not None and found.keys == {"a": [[0, 2], [1]]}
    assert "'a': ranks [0, 2] vs ranks [1]" in found.message()
    with pytest.raises(ValueError, match="rank 1 sent 1 replica checksums for 2 items"):
        divergence_of(held, [[1, 7], [1], [1, 7]])


def test_check_replicas_value_is_checked(tmp_path):
    with pytest.raises(ValueError, match="check_replicas must be one of"):
        shardckpt.save({"w": torch.ones(2)}, tmp_path / "c", check_replicas="loud")
    with pytest.raises(ValueError, match="check_replicas must be one of"):
        shardckpt.CheckpointManager(tmp_path / "m", check_replicas=True)


def _state(rank: int, diverge: str | None) -> dict:
    w = torch.arange(64, dtype=torch.float32)
    if diverge == "tensor" and rank == 1:
        w[37] = torch.nextafter(w[37], torch.tensor(100.0))  # one element, one ulp
    step = rank if diverge == "object" else 5
    return {"w": w, "bias": torch.zeros(3), "step": step, "lr": 0.1, f"own{rank}": torch.ones(2) * rank}


def _target(world: int) -> dict:
    t = _state(0, None)
    t.update({f"own{r}": torch.empty(2) for r in range(world)})
    t["w"].zero_()
    return t


def _no_manifest(path: str) -> bool:
    return not os.path.exists(os.path.join(path, "manifest.json"))


def _worker(rank: int, world: int, root: str) -> None:
    good = os.path.join(root, "good")
    shardckpt.save(_state(rank, None), good)

    for what, key in (("tensor", "'w'"), ("object", "'step'")):
        bad = os.path.join(root, f"bad-{what}")
        with pytest.raises(CheckpointWriteError) as ei:
            shardckpt.save(_state(rank, what), bad)
        msg = str(ei.value)
        assert key in msg and "ranks [0] vs ranks [1]" in msg, msg
        assert "'bias'" not in msg and "'lr'" not in msg, msg  # equal replicas are not named
        assert _no_manifest(bad), f"{bad} committed despite diverged replicas"
        with pytest.raises(ShardckptError):
            shardckpt.load(_target(world), bad)

    # async: raised by async_save itself, before it returns; the next save works
    with pytest.raises(CheckpointWriteError, match="'w'"):
        shardckpt.async_save(_state(rank, "tensor"), os.path.join(root, "bad-async"))
    h = shardckpt.async_save(_state(rank, None), os.path.join(root, "after-async"))
    h.result()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shardckpt.save(_state(rank, "tensor"), os.path.join(root, "warned"), check_replicas="warn")
        shardckpt.save(_state(rank, "tensor"), os.path.join(root, "off"), check_replicas="off")
    diverged = [w for w in caught if issubclass(w.category, shardckpt.ReplicaDivergenceWarning)]
    if rank == 0:
        assert len(diverged) == 1 and "'w'" in str(diverged[0].message), [str(w.message) for w in caught]
    else:
        assert not diverged

    target = _target(world)
    shardckpt.load(target, good)
    assert torch.equal(target["w"], torch.arange(64, dtype=torch.float32))
    assert target["step"] == 5


def test_diverged_replicas_raise_warn_or_pass_at_two_ranks(tmp_path):
    run_multiprocess(_worker, 2, str(tmp_path))
    record("replica divergence", case="tensor, value, async_save", ranks=2, diverged_saves=3,
           detected=3, committed=0)


def _dtensor_worker(rank: int, world: int, root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = init_device_mesh("cpu", (world,))
    same = torch.arange(8, dtype=torch.float32)
    mine = same + rank  # differs per rank
    # Shard(0): each rank's local piece is its own slice: differing data is right
    sharded = {"s": DTensor.from_local(mine, mesh, [Shard(0)], run_check=False)}
    shardckpt.save(sharded, os.path.join(root, "sharded"))
    ok = {"r": DTensor.from_local(same.clone(), mesh, [Replicate()], run_check=False)}
    shardckpt.save(ok, os.path.join(root, "replicated"))
    bad = {"r": DTensor.from_local(mine, mesh, [Replicate()], run_check=False)}
    with pytest.raises(CheckpointWriteError, match="'r': ranks \\[0\\] vs ranks \\[1\\]"):
        shardckpt.save(bad, os.path.join(root, "replicated-bad"))
    assert _no_manifest(os.path.join(root, "replicated-bad"))


def test_replicate_dtensor_copies_are_compared_shards_are_not(tmp_path):
    run_multiprocess(_dtensor_worker, 2, str(tmp_path))
    record("replica divergence", case="Replicate() DTensor", ranks=2, diverged_saves=1, detected=1,
           committed=0)


def _manager_worker(rank: int, world: int, root: str) -> None:
    mgr = shardckpt.CheckpointManager(root, save_interval_steps=1)
    mgr.save(1, _state(rank, None))
    with pytest.raises(CheckpointWriteError, match="'state.w': ranks"):
        mgr.save(2, _state(rank, "tensor"))
    target = _target(world)
    assert mgr.restore(target) == 1
    assert torch.equal(target["w"], torch.arange(64, dtype=torch.float32))
    mgr.close()
    lenient = shardckpt.CheckpointManager(root, save_interval_steps=1, check_replicas="off")
    lenient.save(3, _state(rank, "tensor"))  # passed through to the save: not checked
    lenient.close()


def test_manager_does_not_commit_diverged_replicas(tmp_path):
    run_multiprocess(_manager_worker, 2, str(tmp_path))
    record("replica divergence", case="CheckpointManager.save", ranks=2, diverged_saves=1, detected=1,
           committed=0)
