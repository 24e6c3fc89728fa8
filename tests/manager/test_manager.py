"""CheckpointManager, single process: round trips, fallback on damage, list(),
retention on disk, the owner marker, fsspec roots."""

import glob
import json
import logging
import math
import os
import subprocess
import sys
import uuid

import pytest
import torch

from shardckpt.errors import (
    CheckpointExistsError,
    CheckpointMismatchError,
    CheckpointWriteError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)
from shardckpt.manager import (
    OWNER_MARKER,
    CheckpointManager,
    step_dirname,
)


class Tiny:
    """A minimal Stateful: a tensor, an int and a step."""

    def __init__(self, n=64):
        self.w = torch.zeros(n)
        self.count = 0
        self.step = 0

    def state_dict(self):
        return {"w": self.w, "count": self.count, "step": self.step}

    def load_state_dict(self, sd):
        self.w, self.count, self.step = sd["w"], sd["count"], sd["step"]

    def set(self, step):
        self.w = torch.arange(len(self.w), dtype=torch.float32) + step
        self.count = 10 * step


def run(mgr, steps, state=None, metrics=None):
    state = state or Tiny()
    for s in steps:
        state.set(s)
        if mgr.should_save(s):
            mgr.save(s, state, metrics=metrics(s) if metrics else None)
    return state


def flip_shard_byte(root, step, offset=-1):
    # the largest shard: with several ranks, the one holding the tensor
    shard = max(glob.glob(os.path.join(root, step_dirname(step), "data", "*.bin")), key=os.path.getsize)
    with open(shard, "r+b") as f:
        f.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))


def restored(root, **kw):
    state = Tiny()
    with CheckpointManager(root, **kw) as mgr:
        step = mgr.restore(state)
    return step, state


def test_round_trip_and_fresh_start(tmp_path, caplog):
    root = str(tmp_path / "run")
    caplog.set_level(logging.INFO, logger="shardckpt.manager")
    with CheckpointManager(root) as mgr:
        assert mgr.restore(Tiny()) is None
        assert "fresh start" in caplog.text
        run(mgr, [1, 2, 3])
    step, state = restored(root)
    assert step == 3 and state.step == 3 and state.count == 30
    assert torch.equal(state.w, torch.arange(64.0) + 3)
    assert "restored step 3" in caplog.text
    assert not os.path.exists(os.path.join(root, OWNER_MARKER))


def test_async_save_round_trip_and_retention(tmp_path):
    root = str(tmp_path / "run")
    with CheckpointManager(root, keep_last=2, async_save=True) as mgr:
        state = run(mgr, range(1, 6))
        state.set(99)  # mutating after save returned must not reach the checkpoint
        mgr.wait()
        assert [(c.step, c.status) for c in mgr.list()] == [(4, "valid"), (5, "valid")]
    step, state = restored(root)
    assert step == 5 and torch.equal(state.w, torch.arange(64.0) + 5)


def test_interval_force_and_metrics(tmp_path):
    root = str(tmp_path / "run")
    with CheckpointManager(root, save_interval_steps=10) as mgr:
        assert [mgr.should_save(s) for s in (0, 5, 10, 11)] == [True, False, True, False]
        assert mgr.save(5, Tiny()) is False
        assert mgr.save(5, Tiny(), metrics={"loss": torch.tensor(0.5), "acc": float("nan")}, force=True)
        assert mgr.save(10, Tiny(), metrics={"loss": 0.25})
        (c5, c10) = mgr.list()
    # the JSON codec's NaN rule: a NaN metric is stored (in JSON-safe form) and listed as NaN
    assert (c5.step, c5.status, c5.metrics["loss"]) == (5, "valid", 0.5) and math.isnan(c5.metrics["acc"])
    assert c10.metrics == {"loss": 0.25} and c10.size_bytes > 0 and c10.created_unix > 0
    with CheckpointManager(root) as mgr, pytest.raises(TypeError, match="metric 'x' must be a number"):
        mgr.save(11, Tiny(), metrics={"x": "high"}, force=True)


@pytest.mark.parametrize("verify_on_restore", [True, False, "before"])
def test_flipped_byte_in_newest_falls_back_and_names_reason(tmp_path, caplog, small_chunks, verify_on_restore):
    root = str(tmp_path / "run")
    with CheckpointManager(root) as mgr:
        run(mgr, [1, 2])
    # Damage the last chunk: without verify the load has already written the first
    # chunks of step 2 into the tensor before it fails; the fallback overwrites them.
    flip_shard_byte(root, 2)
    caplog.set_level(logging.WARNING, logger="shardckpt.manager")
    step, state = restored(root, verify_on_restore=verify_on_restore)
    assert step == 1 and state.count == 10 and torch.equal(state.w, torch.arange(64.0) + 1)
    (rec,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "step 2" in rec.message and "corrupt" in rec.message and "CRC32C" in rec.message.upper()
    # The manager remembers what restore found: retention drops the damaged step 2,
    # not the good step 1, although a cheap scan cannot see a flipped bit.
    with CheckpointManager(root, keep_last=2, verify_on_restore=verify_on_restore) as mgr:
        mgr.restore(Tiny())
        assert mgr.list()[1].status == "corrupt"
        run(mgr, [3])
        assert [(c.step, c.status) for c in mgr.list()] == [(1, "valid"), (3, "valid")]


def test_all_corrupt_raises_never_fresh(tmp_path):
    root = str(tmp_path / "run")
    with CheckpointManager(root) as mgr:
        run(mgr, [1, 2])
    flip_shard_byte(root, 1, 0)
    flip_shard_byte(root, 2, 0)
    # verify_on_restore=False cannot turn the checks off: it warns, and the load still checks
    with pytest.warns(DeprecationWarning, match="has no effect"):
        mgr = CheckpointManager(root, verify_on_restore=False)
    with mgr, pytest.raises(CorruptCheckpointError, match="none is usable") as ei:
        mgr.restore(Tiny())
    assert set(ei.value.reasons) == {1, 2} and mgr.verify_on_restore is True


def test_incomplete_newest_falls_back_and_only_incomplete_raises(tmp_path, caplog):
    root = str(tmp_path / "run")
    with CheckpointManager(root) as mgr:
        run(mgr, [1, 2])
    os.remove(os.path.join(root, step_dirname(2), "manifest.json"))
    caplog.set_level(logging.WARNING, logger="shardckpt.manager")
    assert restored(root)[0] == 1
    assert "step 2" in caplog.text and "incomplete" in caplog.text
    os.remove(os.path.join(root, step_dirname(1), "manifest.json"))
    with CheckpointManager(root) as mgr, pytest.raises(IncompleteCheckpointError, match="none is usable"):
        mgr.restore(Tiny())


def test_explicit_step_and_path(tmp_path):
    root = str(tmp_path / "run")
    with CheckpointManager(root) as mgr:
        run(mgr, [1, 2, 3])
        state = Tiny()
        assert mgr.restore(state, step=2) == 2 and state.count == 20
        assert mgr.restore(state, path=os.path.join(root, step_dirname(1))) == 1 and state.count == 10
        flip_shard_byte(root, 3)
        with pytest.raises(CorruptCheckpointError):
            mgr.restore(state, step=3)  # explicit choice: no fallback
        with pytest.raises(FileNotFoundError):
            mgr.restore(state, step=7)
        with pytest.raises(ValueError):
            mgr.restore(state, step=1, path=root)


def test_mismatched_state_raises_instead_of_falling_back(tmp_path):
    root = str(tmp_path / "run")
    with CheckpointManager(root) as mgr:
        run(mgr, [1, 2])
        with pytest.raises(CheckpointMismatchError):
            mgr.restore(Tiny(n=3))


def test_list_statuses_shallow_and_deep(tmp_path):
    root = str(tmp_path / "run")
    with CheckpointManager(root) as mgr:
        run(mgr, [1, 2, 3, 4], metrics=lambda s: {"loss": 1.0 / s})
        flip_shard_byte(root, 2)  # only a deep list reads the data
        os.remove(os.path.join(root, step_dirname(3), "manifest.json"))
        (shard,) = glob.glob(os.path.join(root, step_dirname(4), "data", "*.bin"))
        os.truncate(shard, 10)  # a size check is enough to see this one
        os.makedirs(os.path.join(root, "not_a_step"))
        shallow = {c.step: c.status for c in mgr.list()}
        deep = {c.step: c for c in mgr.list(deep=True)}
    assert shallow == {1: "valid", 2: "valid", 3: "incomplete", 4: "corrupt"}
    assert {s: c.status for s, c in deep.items()} == {1: "valid", 2: "corrupt", 3: "incomplete", 4: "corrupt"}
    assert "CRC32C" in deep[2].reason.upper() and deep[1].metrics == {"loss": 1.0}


def test_retention_on_disk_keeps_newest_and_collects_leftovers(tmp_path):
    root = str(tmp_path / "run")
    with CheckpointManager(root, keep_best=("loss", "min", 1)) as mgr:
        run(mgr, [1, 2], metrics=lambda s: {"loss": float(s)})
        os.makedirs(os.path.join(root, step_dirname(7), "data"))  # a crashed save's leftover
        run(mgr, [3], metrics=lambda s: {"loss": float(s)})
        # best (1) and newest (3) stay; 2 and the leftover go
        assert [c.step for c in mgr.list()] == [1, 3]


def test_fifty_saves_through_the_manager_keep_exactly_the_policy_set():
    from tests.manager.test_retention import val_loss

    root = f"memory://mgr-{uuid.uuid4().hex}/run"
    with CheckpointManager(root, keep_last=3, keep_every=10, keep_best=("val_loss", "min", 2)) as mgr:
        run(mgr, range(1, 51), metrics=lambda s: {"val_loss": val_loss(s)})
        assert {c.step for c in mgr.list()} == {48, 49, 50, 10, 20, 30, 40, 7, 23}


def test_a_step_saved_again_replaces_the_old_one(tmp_path):
    root = str(tmp_path / "run")
    with CheckpointManager(root) as mgr:
        run(mgr, [1, 2])
    with CheckpointManager(root) as mgr:
        state = Tiny()
        start = mgr.restore(state)
        run(mgr, range(start, 4), state)  # the loop re-saves its start step
    assert [c.step for c in CheckpointManager(root).list()] == [1, 2, 3]


def test_second_manager_on_a_root_is_refused_until_close(tmp_path):
    root = str(tmp_path / "run")
    first = CheckpointManager(root)
    with pytest.raises(CheckpointExistsError, match="in use by another CheckpointManager"):
        CheckpointManager(root)
    first.close()
    with CheckpointManager(root) as second:
        second.save(1, Tiny())


def test_stale_owner_is_taken_over_and_a_usurped_manager_stops_saving(tmp_path, caplog):
    root = tmp_path / "run"
    root.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (root / OWNER_MARKER).write_text(json.dumps({"hostname": socket.gethostname(), "pid": int(dead.stdout)}))
    caplog.set_level(logging.WARNING, logger="shardckpt.manager")
    first = CheckpointManager(str(root))
    assert "stale owner" in caplog.text and "is gone" in caplog.text
    second = CheckpointManager(str(root), take_over_lock=True)
    with pytest.raises(CheckpointExistsError, match="no longer owns"):
        first.save(1, Tiny())
    first.close()  # must not remove the new owner's marker
    assert (root / OWNER_MARKER).exists()
    second.save(1, Tiny())
    second.close()


def test_memory_url_root():
    root = f"memory://mgr-{uuid.uuid4().hex}/run"
    with CheckpointManager(root, keep_last=2, async_save=True) as mgr:
        run(mgr, range(1, 5), metrics=lambda s: {"loss": 1.0 / s})
        mgr.wait()
        assert [(c.step, c.status) for c in mgr.list()] == [(3, "valid"), (4, "valid")]
        assert mgr.list()[0].path == f"{root}/{step_dirname(3)}"
        with pytest.raises(CheckpointExistsError):
            CheckpointManager(root)
    step, state = restored(root)
    assert step == 4 and torch.equal(state.w, torch.arange(64.0) + 4)


def test_closed_manager_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        CheckpointManager(str(tmp_path / "a"), save_interval_steps=0)
    with pytest.raises(ValueError):
        CheckpointManager(str(tmp_path / "b"), keep_best=("loss",))
    mgr = CheckpointManager(str(tmp_path / "c"))
    with pytest.raises(ValueError, match="exit_code"):
        mgr.install_signal_handlers(exit_code=0)
    mgr.close()
    mgr.close()
    with pytest.raises(Exception, match="closed"):
        mgr.save(1, Tiny())


def test_read_only_manager_restores_beside_a_live_owner_and_never_saves(tmp_path):
    owner = CheckpointManager(tmp_path)
    owner.save(1, {"w": torch.arange(4.0)})
    reader = CheckpointManager(tmp_path, read_only=True)  # takes no ownership
    got = {"w": torch.zeros(4)}
    assert reader.restore(got) == 1 and torch.equal(got["w"], torch.arange(4.0))
    with pytest.raises(CheckpointWriteError, match="read_only"):
        reader.save(2, got, force=True)
    reader.close()
    owner.save(2, {"w": torch.ones(4)})  # the owner's marker is still its own
    owner.close()
    with pytest.raises(ValueError, match="read_only"):
        CheckpointManager(tmp_path, read_only=True, async_save=True)


def test_verify_before_leaves_the_state_untouched_when_nothing_verifies(tmp_path, small_chunks):
    root = str(tmp_path / "run")
    with CheckpointManager(root) as mgr:
        run(mgr, [1])
    flip_shard_byte(root, 1)  # the last chunk: a direct load would have written the first ones
    state = Tiny()
    before = state.w.clone()
    with CheckpointManager(root, verify_on_restore="before") as mgr:
        with pytest.raises(CorruptCheckpointError, match="none is usable"):
            mgr.restore(state)
    assert torch.equal(state.w, before)
    with pytest.raises(ValueError, match="verify_on_restore"):
        CheckpointManager(root, verify_on_restore="always")
