"""Async save: snapshot semantics, staging reuse and budget, failures, busy policies, exit."""

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import shardckpt
from shardckpt.errors import CheckpointWriteError, SaveInProgressError
from shardckpt.io.save_target import SaveTarget
from tests.helpers import assert_state_equal, gate_writes


@pytest.fixture
def ckpt():
    c = shardckpt.AsyncCheckpointer()
    yield c
    try:
        c.close()
    except CheckpointWriteError:
        pass


def _state():
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(300, 17, generator=g),
        "half": torch.randn(1000, generator=g).bfloat16(),
        "nc": torch.randn(20, 30, generator=g).t(),
        "step": 5,
        "hist": [1.0, 2.0],
        "nested": {"b": torch.arange(100)},
    }


def _load(path):
    out = {"w": torch.zeros(300, 17), "half": torch.zeros(1000).bfloat16(), "nc": torch.zeros(30, 20),
           "step": 0, "hist": [0.0, 0.0], "nested": {"b": torch.zeros(100, dtype=torch.int64)}}
    shardckpt.load(out, path)
    return out


def _clone(sd):
    return {k: _clone(v) if isinstance(v, dict) else v.clone() if isinstance(v, torch.Tensor) else list(v) if isinstance(v, list) else v for k, v in sd.items()}


@pytest.mark.parametrize("budget", [None, 4096])
def test_checkpoint_holds_values_at_call_time(tmp_path, ckpt, budget):
    sd = _state()
    expected = _clone(sd)
    with shardckpt.knobs.override(chunk_bytes=1024):
        h = ckpt.async_save(sd, tmp_path / "c", staging_budget_bytes=budget)
    # mutate everything in place, free nothing the engine should still need
    for t in (sd["w"], sd["half"], sd["nc"], sd["nested"]["b"]):
        t.add_(1)
    sd["hist"].append(3.0)
    sd["hist"][0] = -1.0
    h.result()
    assert h.done()
    assert_state_equal(_load(tmp_path / "c"), expected)
    shardckpt.verify(tmp_path / "c")


def test_async_and_sync_checkpoints_are_identical(tmp_path, ckpt):
    sd = _state()
    with shardckpt.knobs.override(chunk_bytes=512):
        ckpt.async_save(sd, tmp_path / "a").result()
        shardckpt.save(sd, tmp_path / "s")
    (fa,) = os.listdir(tmp_path / "a" / "data")
    (fs,) = os.listdir(tmp_path / "s" / "data")
    assert (tmp_path / "a" / "data" / fa).read_bytes() == (tmp_path / "s" / "data" / fs).read_bytes()
    ma = json.loads((tmp_path / "a" / "manifest.json").read_text())["body"]["entries"]
    ms = json.loads((tmp_path / "s" / "manifest.json").read_text())["body"]["entries"]
    strip = lambda e: {k: {kk: vv for kk, vv in v.items()} for k, v in e.items()}  # noqa: E731
    assert json.dumps(strip(ma), sort_keys=True).replace(fa, "F") == json.dumps(strip(ms), sort_keys=True).replace(fs, "F")


def test_staging_buffers_are_reused_across_saves(tmp_path, ckpt):
    sd = {"a": torch.randn(1000), "b": torch.randn(50)}
    ckpt.async_save(sd, tmp_path / "1").result()
    before = {k: v.data_ptr() for k, v in ckpt._pool._buffers.items()}
    ckpt.async_save(sd, tmp_path / "2").result()
    after = {k: v.data_ptr() for k, v in ckpt._pool._buffers.items()}
    assert before == after and len(after) == 2
    sd["a"] = torch.randn(2000)  # grown: replaced; "b" kept
    ckpt.async_save(sd, tmp_path / "3").result()
    grown = {k.fqn: v for k, v in ckpt._pool._buffers.items()}
    assert grown["a"].numel() == 8000 and grown["b"].data_ptr() in before.values()


def test_budget_bounds_staging_memory(tmp_path, ckpt):
    sd = {f"t{i}": torch.randn(10_000) for i in range(5)}  # 200 kB
    h = ckpt.async_save(sd, tmp_path / "c", staging_budget_bytes=32 << 10)
    h.result()
    assert ckpt._pool.held_bytes <= 32 << 10
    out = {k: torch.zeros(10_000) for k in sd}
    shardckpt.load(out, tmp_path / "c")
    assert all(torch.equal(out[k], sd[k]) for k in sd)


def test_unwritable_target_fails_in_the_call(tmp_path, ckpt):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointWriteError, match="Not a directory|exists and is not a directory"):
        ckpt.async_save({"a": torch.ones(2)}, blocker / "c")  # parent is a file: fails while planning
    ckpt.async_save({"a": torch.ones(2)}, tmp_path / "ok").result()


def test_background_failure_is_raised_and_nothing_committed(tmp_path, ckpt, monkeypatch):
    shardckpt.save({"a": torch.ones(2)}, tmp_path / "good")
    real = SaveTarget.write_items

    def disk_full(self, *args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SaveTarget, "write_items", disk_full)
    h = ckpt.async_save({"a": torch.ones(2)}, tmp_path / "c")
    with pytest.raises(CheckpointWriteError, match="No space left"):
        h.result()
    h2 = ckpt.async_save({"a": torch.ones(2)}, tmp_path / "d")
    while not h2.done():  # wait without asking for its result: the failure stays unreported
        time.sleep(0.01)
    monkeypatch.setattr(SaveTarget, "write_items", real)
    # an unreported failure surfaces on the next save (which does not start), then is cleared
    with pytest.raises(CheckpointWriteError, match="earlier async save failed"):
        ckpt.async_save({"a": torch.ones(2)}, tmp_path / "next")
    assert h2.done() and not (tmp_path / "next").exists()
    for p in ("c", "d"):
        assert not (tmp_path / p / "manifest.json").exists()
    ckpt.async_save({"a": torch.ones(2)}, tmp_path / "next").result()
    shardckpt.verify(tmp_path / "good")


def test_failure_midway_leaves_target_uncommitted(tmp_path, ckpt, monkeypatch):
    real = SaveTarget.commit_assigned

    def failing_finish(self, skeleton, written):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SaveTarget, "commit_assigned", failing_finish)
    h = ckpt.async_save({"a": torch.ones(2)}, tmp_path / "c")
    with pytest.raises(CheckpointWriteError, match="No space left"):
        h.result()
    assert not (tmp_path / "c").exists()  # the failed save removed what it had written
    with pytest.raises(shardckpt.CheckpointNotFoundError):
        shardckpt.verify(tmp_path / "c")
    monkeypatch.setattr(SaveTarget, "commit_assigned", real)
    ckpt.async_save({"a": torch.ones(2)}, tmp_path / "c").result()
    shardckpt.verify(tmp_path / "c")


@pytest.fixture
def slow_writes(monkeypatch):
    gate = gate_writes(monkeypatch, wait_s=30)
    yield gate
    gate.set()


def test_busy_policies(tmp_path, ckpt, slow_writes):
    sd = {"a": torch.ones(3)}
    h1 = ckpt.async_save(sd, tmp_path / "1")
    assert not h1.done()
    assert ckpt.async_save(sd, tmp_path / "skipped", busy="skip") is None
    with pytest.raises(SaveInProgressError):
        ckpt.async_save(sd, tmp_path / "err", busy="error")
    with pytest.raises(TimeoutError):
        h1.result(timeout=0.05)
    threading.Timer(0.2, slow_writes.set).start()
    h2 = ckpt.async_save(sd, tmp_path / "2")  # busy="wait": waits for h1 first
    assert h1.done()
    h2.result()
    assert not (tmp_path / "skipped").exists() and not (tmp_path / "err").exists()
    with pytest.raises(ValueError):
        ckpt.async_save(sd, tmp_path / "x", busy="later")


def test_sync_save_waits_for_inflight_async(tmp_path, slow_writes):
    h = shardckpt.async_save({"a": torch.ones(3)}, tmp_path / "a")
    threading.Timer(0.2, slow_writes.set).start()
    shardckpt.save({"a": torch.ones(3)}, tmp_path / "s")
    assert h.done()
    shardckpt.close()


def test_close_waits_and_context_manager(tmp_path, slow_writes):
    with shardckpt.AsyncCheckpointer() as c:
        h = c.async_save({"a": torch.ones(3)}, tmp_path / "c")
        threading.Timer(0.2, slow_writes.set).start()
    assert h.done()
    shardckpt.verify(tmp_path / "c")
    with pytest.raises(CheckpointWriteError, match="closed"):
        c.async_save({"a": torch.ones(3)}, tmp_path / "d")


def test_interpreter_exit_finishes_inflight_save(tmp_path):
    script = textwrap.dedent(f"""
        import torch, shardckpt
        sd = {{f"t{{i}}": torch.randn(1 << 20) for i in range(16)}}
        shardckpt.async_save(sd, {str(tmp_path / "c")!r})
        # exit without result() or close()
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert shardckpt.verify(tmp_path / "c").bytes_checked == 16 * 4 << 20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_stage_into_pinned_memory(tmp_path, ckpt):
    sd = {"w": torch.randn(1 << 20, device="cuda"), "b": torch.randn(7, 5, device="cuda").t()}
    expected = {k: v.cpu() for k, v in sd.items()}
    h = ckpt.async_save(sd, tmp_path / "c")
    for v in sd.values():
        v.add_(1)
    assert all(b.is_pinned() for b in ckpt._pool._buffers.values())
    h.result()
    out = {k: torch.zeros_like(v) for k, v in expected.items()}
    shardckpt.load(out, tmp_path / "c")
    assert all(torch.equal(out[k], expected[k]) for k in out)


def test_knobs_are_snapshot_at_call_time(tmp_path, ckpt, slow_writes):
    """An override around async_save governs the write that runs later, on another thread."""
    with shardckpt.knobs.override(chunk_bytes=256):
        h = ckpt.async_save(_state(), tmp_path / "k")  # the write waits on the gate
    slow_writes.set()  # ...and starts only once the override is gone
    h.result()
    m = json.loads((tmp_path / "k" / "manifest.json").read_text())["body"]
    chunks = [c for s in m["entries"]["w"]["shards"] for c in s["chunks"]]
    assert m["chunk_bytes"] == 256 and len(chunks) > 10 and max(c[1] for c in chunks) <= 256
